"""The seq2seq trainer's state and compiled steps: pure functions of plain pytrees.

State: {step, params, opt_state}. A batch holds `text_ids` (B, text_length) and `codes` (B, image_length). One
train step blanks captions with probability `blank_caption_prob` (so the model also learns the unconditional
distribution that guidance needs), accumulates gradients over `accumulation_steps` micro-batches and applies one
optimizer update. Randomness is `fold_in(seed, step)` on a branch of its own, so a resumed run draws exactly what an
unbroken one would. An update whose loss, gradients or result are not finite is skipped (metric `nonfinite`).
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

from dalle_jax import extensions, parallel
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
        return text_lib.empty_caption_ids(int(self.config.model.text_length))

    def model(self, params, dropout_key: jax.Array | None = None) -> DalleBart:
        """The model with `params`; its dropout streams are seeded from `dropout_key` (any fixed key if None)."""
        key = jax.random.key(0) if dropout_key is None else dropout_key
        return nnx.merge(self.graphdef, params, tl.fresh_rng_state(self.rng_state, key))

    def activation_sharding(self):
        return parallel.activation_sharding(self.mesh, self.config.sharding_rules)


def model_class(config: ml_collections.ConfigDict) -> type[DalleBart]:
    """The class the run builds: DalleBart, or the subclass an extension's `model_class` hook gives."""
    return extensions.model_class(config, DalleBart)


def _model(config, seed: int) -> DalleBart:
    key = jax.random.key(seed)
    return model_class(config)(config.model, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0),
                                                 dropout=jax.random.fold_in(key, 1)))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any compilation on settings the step cannot run with."""
    extensions.check_config(config)
    model_class(config).validate_config(config.model)
    if config.model.text_length < text_lib.MIN_MAX_LENGTH:
        raise ValueError(f"config.model.text_length={config.model.text_length} leaves no room for `<s>`, a token and "
                         f"`</s>`; use at least {text_lib.MIN_MAX_LENGTH}.")
    k = int(config.optimizer.accumulation_steps)
    if k < 1 or config.data.batch_size % k:
        raise ValueError(f"config.optimizer.accumulation_steps={k} must be >= 1 and divide config.data.batch_size="
                         f"{config.data.batch_size}.")
    for name in ("blank_caption_prob", "canonical_caption_prob"):
        if not 0.0 <= config.data[name] <= 1.0:
            raise ValueError(f"config.data.{name}={config.data[name]} must be in [0, 1].")


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


def _loss(setup: Setup, params, text_ids, codes, dropout_key, *, deterministic: bool):
    """Loss and metrics of predicting `codes`, teacher-forced."""
    cfg = setup.config
    model = setup.model(params, dropout_key)
    logits = model(text_ids, dalle_bart.teacher_forcing_inputs(codes, model.start_token), deterministic=deterministic)
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


def gradients(setup: Setup, params, text_ids, codes, dropout_key):
    """Mean loss gradients and metrics over the batch, accumulated over `accumulation_steps` micro-batches."""
    k = int(setup.config.optimizer.accumulation_steps)
    grad_fn = jax.value_and_grad(lambda p, t, c, key: _loss(setup, p, t, c, key, deterministic=False), has_aux=True)
    if k == 1:
        (_, metrics), grads = grad_fn(params, text_ids, codes, dropout_key)
        return grads, metrics

    def accumulate(carry, micro):
        (_, m), g = grad_fn(params, micro["text_ids"], micro["codes"], jax.random.fold_in(dropout_key, micro["index"]))
        return jax.tree.map(jnp.add, carry, (g, m)), None

    micro = dict(text_ids=_micro_batches(text_ids, k, setup.mesh), codes=_micro_batches(codes, k, setup.mesh),
                 index=jnp.arange(k))
    (_, metrics_shape), grads_shape = jax.eval_shape(grad_fn, params, micro["text_ids"][0], micro["codes"][0],
                                                     dropout_key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro)
    return jax.tree.map(lambda x: x / k, (grads, metrics))


def train_step(setup: Setup, state, batch):
    cfg = setup.config
    step = state["step"]
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 2), step)
    text_ids, blank = blank_captions(batch["text_ids"], setup.empty_text_ids, cfg.data.blank_caption_prob,
                                     jax.random.fold_in(rng, 0))
    with setup.activation_sharding():
        grads, metrics = gradients(setup, state["params"], text_ids, batch["codes"], jax.random.fold_in(rng, 1))
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
