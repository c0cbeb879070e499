"""The seq2seq trainer's state and compiled steps: pure functions of plain pytrees.

State: {step, params, opt_state}. A batch holds `text_ids` (B, text_length) and `codes` (B, image_length). One
train step blanks captions with probability `blank_caption_prob` (so the model also learns the unconditional
distribution that guidance needs), replaces teacher-forced image inputs by random codes with probability
`input_token_noise_prob` (the targets stay the true codes), accumulates gradients over `accumulation_steps`
micro-batches and applies one optimizer update. Randomness is `fold_in(seed, step)` on a branch of its own, so a
resumed run draws exactly what an unbroken one would. An update whose loss, gradients or result are not finite is skipped (metric `nonfinite`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dalle_jax import parallel
from dalle_jax.data import text as text_lib
from dalle_jax.models import dalle_bart, seq2seq_loss, transformer_layers as tl
from dalle_jax.models.dalle_bart import DalleBart
from dalle_jax.training import finite_updates, optimizers


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run's step functions."""
    config: ml_collections.ConfigDict
    mesh: Mesh
    graphdef: nnx.GraphDef
    rng_state: Any  # shapes of the model's dropout stream state, which every step fills afresh
    tx: optax.GradientTransformation

    @property
    def empty_text_ids(self) -> np.ndarray:
        """The empty caption: `<s></s>` then padding."""
        ids = np.full((self.config.model.text_length,), text_lib.PAD_ID, np.int32)
        ids[:2] = (text_lib.BOS_ID, text_lib.EOS_ID)
        return ids

    def model(self, params, dropout_key: jax.Array | None = None) -> DalleBart:
        """The model with `params`; its dropout streams are seeded from `dropout_key` (any fixed key if None)."""
        key = jax.random.key(0) if dropout_key is None else dropout_key
        return nnx.merge(self.graphdef, params, tl.fresh_rng_state(self.rng_state, key))

    def activation_sharding(self):
        return parallel.activation_sharding(self.mesh, self.config.sharding_rules)


def _model(config, seed: int) -> DalleBart:
    key = jax.random.key(seed)
    return DalleBart(config.model, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0),
                                                 dropout=jax.random.fold_in(key, 1)))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any compilation on settings the step cannot run with."""
    dalle_bart.validate_config(config.model)
    if config.model.text_length < text_lib.MIN_MAX_LENGTH:
        raise ValueError(f"config.model.text_length={config.model.text_length} leaves no room for `<s>`, a token and "
                         f"`</s>`; use at least {text_lib.MIN_MAX_LENGTH}.")
    k = int(config.optimizer.accumulation_steps)
    if k < 1 or config.data.batch_size % k:
        raise ValueError(f"config.optimizer.accumulation_steps={k} must be >= 1 and divide config.data.batch_size="
                         f"{config.data.batch_size}.")
    for name in ("blank_caption_prob", "canonical_caption_prob"):
        if not 0.0 <= config.data.get(name, 0.0) <= 1.0:
            raise ValueError(f"config.data.{name}={config.data.get(name)} must be in [0, 1].")
    steps = left_or_above_caption_steps(config)
    if steps < 0:
        raise ValueError(f"config.data.left_or_above_caption_steps={steps} must be >= 0.")
    if steps and config.data.dataset != "captioned_shapes":
        raise ValueError(f"config.data.left_or_above_caption_steps={steps} rewords captioned_shapes scenes, but "
                         f"config.data.dataset={config.data.dataset!r}; set it to 0.")
    if not 0.0 <= input_token_noise_prob(config) < 1.0:
        raise ValueError(f"config.data.input_token_noise_prob={input_token_noise_prob(config)} must be in [0, 1): at 1 "
                         "the model never sees its previous image tokens.")


def input_token_noise_prob(config: ml_collections.ConfigDict) -> float:
    """Chance a teacher-forced image input is replaced by a random code (0 for configs written before the field)."""
    return float(config.data.get("input_token_noise_prob", 0.0))


def left_or_above_caption_steps(config: ml_collections.ConfigDict) -> int:
    """Steps in which two-object scenes take their left-or-above caption (0 for configs written before the field)."""
    return int(config.data.get("left_or_above_caption_steps", 0))


def create(config: ml_collections.ConfigDict, mesh: Mesh, *, initialize: bool = True):
    """Returns the static setup, the initial state (built directly sharded; None when not `initialize`) and the
    state's shardings."""
    check_config(config)
    abstract = nnx.eval_shape(lambda: _model(config, config.seed))
    graphdef, abstract_params, abstract_rng = nnx.split(abstract, nnx.Param, ...)
    tx = optimizers.make_optimizer(config.optimizer, config.num_steps)
    setup = Setup(config, mesh, graphdef, abstract_rng.to_pure_dict(), tx)

    param_sh = parallel.state_shardings(abstract_params, mesh, config.sharding_rules)
    opt_sh = parallel.optimizer_shardings(tx, jax.eval_shape(tx.init, abstract_params.to_pure_dict()), param_sh,
                                          mesh)
    shardings = dict(step=parallel.replicated(mesh), params=param_sh, opt_state=opt_sh)
    if not initialize:
        return setup, None, shardings

    def init():
        params = nnx.state(_model(config, config.seed), nnx.Param).to_pure_dict()
        return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return setup, parallel.init_sharded(init, shardings), shardings


def _loss(setup: Setup, params, text_ids, codes, dropout_key, *, deterministic: bool, input_ids=None):
    """Loss and metrics of predicting `codes`; the decoder reads `input_ids` (default: the teacher-forcing inputs)."""
    cfg = setup.config
    model = setup.model(params, dropout_key)
    inputs = dalle_bart.teacher_forcing_inputs(codes, model.start_token) if input_ids is None else input_ids
    logits = model(text_ids, inputs, deterministic=deterministic)
    return seq2seq_loss.image_token_loss(logits, codes, num_classes=cfg.model.image_vocab_size,
                                         label_smoothing=cfg.loss.label_smoothing, z_loss=cfg.loss.z_loss)


def _micro_batches(x: jax.Array, k: int, mesh: Mesh) -> jax.Array:
    """(B, ...) -> (k, B/k, ...) where micro-batch j holds rows j, j+k, j+2k, ...: every device keeps an equal
    share of every micro-batch, so no data moves between devices."""
    micro = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, P(None, parallel.BATCH_AXES)))


def blank_captions(text_ids: jax.Array, empty_text_ids, prob: float, key: jax.Array):
    """Replaces each row by the empty caption with probability `prob`; returns (text_ids, which rows)."""
    blank = jax.random.bernoulli(key, prob, (text_ids.shape[0],))
    return jnp.where(blank[:, None], jnp.asarray(empty_text_ids)[None], text_ids), blank


def noisy_image_inputs(input_ids: jax.Array, prob: float, image_vocab_size: int, key: jax.Array) -> jax.Array:
    """Replaces each teacher-forced input after the start token by a uniformly drawn code with probability `prob`.
    A model that cannot trust its previous tokens has to read more of what to draw from the caption."""
    replace_key, code_key = jax.random.split(key)
    replace = jax.random.bernoulli(replace_key, prob, input_ids.shape).at[:, 0].set(False)
    random_codes = jax.random.randint(code_key, input_ids.shape, 0, image_vocab_size, input_ids.dtype)
    return jnp.where(replace, random_codes, input_ids)


def gradients(setup: Setup, params, text_ids, codes, dropout_key, input_ids=None):
    """Mean loss gradients and metrics over the batch, accumulated over `accumulation_steps` micro-batches;
    `input_ids` as in `_loss`."""
    k = int(setup.config.optimizer.accumulation_steps)
    if input_ids is None:
        input_ids = dalle_bart.teacher_forcing_inputs(codes, int(setup.config.model.image_vocab_size))
    grad_fn = jax.value_and_grad(
        lambda p, t, c, i, key: _loss(setup, p, t, c, key, deterministic=False, input_ids=i), has_aux=True)
    if k == 1:
        (_, metrics), grads = grad_fn(params, text_ids, codes, input_ids, dropout_key)
        return grads, metrics

    def accumulate(carry, micro):
        (_, m), g = grad_fn(params, micro["text_ids"], micro["codes"], micro["input_ids"],
                            jax.random.fold_in(dropout_key, micro["index"]))
        return jax.tree.map(jnp.add, carry, (g, m)), None

    micro = dict(text_ids=_micro_batches(text_ids, k, setup.mesh), codes=_micro_batches(codes, k, setup.mesh),
                 input_ids=_micro_batches(input_ids, k, setup.mesh), index=jnp.arange(k))
    (_, metrics_shape), grads_shape = jax.eval_shape(grad_fn, params, micro["text_ids"][0], micro["codes"][0],
                                                     micro["input_ids"][0], dropout_key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro)
    return jax.tree.map(lambda x: x / k, (grads, metrics))


def train_step(setup: Setup, state, batch):
    cfg = setup.config
    step = state["step"]
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 2), step)
    text_ids, blank = blank_captions(batch["text_ids"], setup.empty_text_ids, cfg.data.blank_caption_prob,
                                     jax.random.fold_in(rng, 0))
    input_ids = dalle_bart.teacher_forcing_inputs(batch["codes"], int(cfg.model.image_vocab_size))
    if input_token_noise_prob(cfg) > 0:  # no draw at 0, so runs without noise keep their random streams
        input_ids = noisy_image_inputs(input_ids, input_token_noise_prob(cfg), int(cfg.model.image_vocab_size),
                                       jax.random.fold_in(rng, 2))
    with setup.activation_sharding():
        grads, metrics = gradients(setup, state["params"], text_ids, batch["codes"], jax.random.fold_in(rng, 1),
                                   input_ids)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # A non-finite loss, gradient or update is skipped: parameters and optimizer state stay as they were.
    (params, opt_state), nonfinite = finite_updates.keep_if_finite(
        finite_updates.all_finite(metrics["loss"], grads, updates), (params, opt_state),
        (state["params"], state["opt_state"]))
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), blank_captions=jnp.mean(blank.astype(jnp.float32)),
                   nonfinite=nonfinite)
    return dict(step=step + 1, params=params, opt_state=opt_state), metrics


def eval_step(setup: Setup, params, batch):
    """Per-batch means of the cross-entropy and token accuracy on unchanged captions, without dropout."""
    with setup.activation_sharding():
        _, metrics = _loss(setup, params, batch["text_ids"], batch["codes"], None, deterministic=True)
    return dict(cross_entropy=metrics["cross_entropy"], token_accuracy=metrics["token_accuracy"])
