"""The caption model's state and compiled steps: pure functions of plain pytrees.

State: {step, params, opt_state}, replicated (the model is small); batches are split over the mesh's batch axes.
The loss is the mean negative log-likelihood per caption token. An update whose loss, gradients or result are not
finite is skipped. Evaluation also counts how often a two-object scene's canonical caption is likelier than its
twins (relation reversed, colours or shapes exchanged), which differ from it only in which object is which.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dalle_jax import parallel
from dalle_jax.models import captioner as captioner_lib, transformer_layers as tl
from dalle_jax.models.captioner import Captioner
from dalle_jax.training import finite_updates, optimizers


@dataclasses.dataclass(frozen=True)
class Setup:
    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    rng_state: Any  # shapes of the layers' dropout streams (rate 0: never drawn from, but part of the graph)
    tx: optax.GradientTransformation

    def model(self, params) -> Captioner:
        return nnx.merge(self.graphdef, params, tl.fresh_rng_state(self.rng_state, jax.random.key(0)))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any compilation on settings the step cannot run with."""
    captioner_lib.validate_config(config.model)
    if config.train_examples == 0 or config.train_examples < -1:
        raise ValueError(f"config.train_examples={config.train_examples} must be a number of records >= 1, or -1 "
                         "for all of them.")
    for field in ("batch_size", "eval_batch_size", "eval_examples"):
        if int(config[field]) < 1:
            raise ValueError(f"config.{field}={config[field]} must be at least 1.")
    if config.eval_batch_size > config.eval_examples:
        raise ValueError(f"config.eval_batch_size={config.eval_batch_size} is larger than config.eval_examples="
                         f"{config.eval_examples}, so no batch would be evaluated; lower it.")


def abstract_model(config: ml_collections.ConfigDict) -> Captioner:
    return nnx.eval_shape(lambda: Captioner(config.model, rngs=nnx.Rngs(config.seed)))


def create(config: ml_collections.ConfigDict, mesh, *, initialize: bool = True):
    """The static setup, the initial state (None when not `initialize`) and the state's shardings (replicated)."""
    check_config(config)
    graphdef, _, rng_state = nnx.split(abstract_model(config), nnx.Param, ...)
    tx = optimizers.make_optimizer(config.optimizer, config.num_steps)
    setup = Setup(config, graphdef, rng_state.to_pure_dict(), tx)
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), jax.eval_shape(
        lambda: _init(config, tx)))
    if not initialize:
        return setup, None, shardings
    return setup, parallel.init_sharded(lambda: _init(config, tx), shardings), shardings


def _init(config, tx) -> dict:
    params = nnx.state(Captioner(config.model, rngs=nnx.Rngs(config.seed)), nnx.Param).to_pure_dict()
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def caption_loss(model: Captioner, images: jax.Array, text_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean negative log-likelihood per caption token, and the share of tokens given probability above 1/2."""
    token_log_probs, real = model.token_log_probs(model.encode_images(images), text_ids)
    count = jnp.maximum(real.sum(), 1)
    return (-jnp.where(real, token_log_probs, 0.0).sum() / count,
            (real & (token_log_probs > jnp.log(0.5))).sum() / count)


def train_step(setup: Setup, state: dict, batch: dict):
    def loss_fn(params):
        nll, accuracy = caption_loss(setup.model(params), batch["images"], batch["text_ids"])
        return nll, dict(loss=nll, token_accuracy=accuracy)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    new = dict(step=state["step"] + 1, params=optax.apply_updates(state["params"], updates), opt_state=opt_state)
    finite = finite_updates.all_finite(loss, grads, new["params"])
    new, nonfinite = finite_updates.keep_if_finite(finite, new, dict(state, step=state["step"] + 1))
    return new, dict(metrics, nonfinite=nonfinite)


def eval_step(setup: Setup, params, batch: dict) -> dict:
    """Summed caption log-likelihood and token count over the batch's captions (every caption of each image),
    and the twin ranking's wins and count over its two-object scenes."""
    model = setup.model(params)
    encoded = model.encode_images(batch["images"])
    captions, twin_ids, twin_rows = batch["captions"], batch["twin_ids"], batch["twin_rows"]
    b, c, t = captions.shape
    token_log_probs, real = model.token_log_probs(jnp.repeat(encoded, c, axis=0), captions.reshape(b * c, t))
    real = real & batch["caption_rows"].reshape(b * c, 1)
    scores = model.caption_log_likelihood(jnp.repeat(encoded, twin_ids.shape[1], axis=0),
                                          twin_ids.reshape(-1, t)).reshape(twin_rows.shape)
    two_object = twin_rows[:, 0]
    best = jnp.argmax(jnp.where(twin_rows, scores, -jnp.inf), axis=1)
    return dict(log_likelihood=jnp.where(real, token_log_probs, 0.0).sum(), tokens=real.sum(),
                twin_wins=(two_object & (best == 0)).sum(), twin_scenes=two_object.sum())
