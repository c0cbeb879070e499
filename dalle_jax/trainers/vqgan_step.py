"""The VQGAN trainer's state and compiled steps: pure functions of plain pytrees.

State: {step, params, disc_params, opt_g, opt_d, code_ema}. One train step updates the generator (reconstruction +
codebook + commitment + adaptive-weight GAN terms) and the discriminator (hinge loss) together, then restarts dead
codes on schedule; a step whose losses, gradients or updates are not finite is skipped (metric `nonfinite`).
Randomness is `fold_in(seed, step)` (on a branch of its own), so a resumed run draws exactly
what an unbroken one would. Both steps trace under `Setup.activation_sharding`, which pins the models' feature maps
(batch over data x fsdp, channels over tensor).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from dalle_jax import parallel
from dalle_jax.models import quantizer as vq
from dalle_jax.models.discriminator import PatchDiscriminator
from dalle_jax.models.vqgan import VQGAN
from dalle_jax.training import finite_updates, gan_losses, optimizers


# Where the models' activation names (dalle_jax/models/conv_layers.py) go when the recipe's sharding_rules do not
# name them: the batch over both data-parallel axes, feature channels over tensor alone. Never over fsdp: unpinned,
# the feature maps took the kernels' fsdp split, and on a data x fsdp x tensor mesh XLA then mis-partitioned
# attention's batched dot (wrong losses from step 1 on; docs/research/spmd_batched_dot.md).
ACTIVATION_RULES = (("batch", parallel.BATCH_AXES), ("channels", "tensor"))


def activation_rules(rules) -> tuple:
    """The recipe's rules, followed by `ACTIVATION_RULES` for the activation names they leave out. Raises on rules
    that split feature channels over more than one mesh axis or over a batch axis."""
    rules = tuple(rules) + tuple(rule for rule in ACTIVATION_RULES if rule[0] not in {name for name, _ in rules})
    table = dict(rules)
    axes = lambda target: (target,) if isinstance(target, str) else tuple(target or ())
    channels, batch = axes(table["channels"]), axes(table["batch"])
    if len(channels) > 1 or set(channels) & set(batch):
        raise ValueError(
            f"config.sharding_rules maps the activation name 'channels' to {table['channels']!r} with 'batch' on "
            f"{table['batch']!r}. Map 'channels' to one mesh axis that 'batch' does not use, e.g. "
            f"('channels', 'tensor'): feature maps split over two axes make XLA mis-partition the VQGAN's attention "
            f"on a three-axis mesh (docs/research/spmd_batched_dot.md).")
    return rules


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run's step functions."""
    config: ml_collections.ConfigDict
    mesh: Mesh
    generator: nnx.GraphDef
    discriminator: nnx.GraphDef
    tx_g: optax.GradientTransformation
    tx_d: optax.GradientTransformation
    tokens_per_batch: int

    @property
    def gan_enabled(self) -> bool:
        return self.config.loss.disc_start < self.config.num_steps

    def activation_sharding(self):
        """Context in which the steps are traced: activations pinned by `activation_rules`."""
        return parallel.activation_sharding(self.mesh, activation_rules(self.config.sharding_rules))


def _models(config, seed: int):
    key = jax.random.key(seed)
    generator = VQGAN(config.model, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    discriminator = PatchDiscriminator(config.disc, rngs=nnx.Rngs(params=jax.random.fold_in(key, 1)))
    return generator, discriminator


def _params(module) -> dict:
    return nnx.state(module, nnx.Param).to_pure_dict()


def create(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Setup, Any, Any]:
    """Returns the static setup, the initial state (built directly sharded) and the state's shardings."""
    abstract_gen, abstract_disc = nnx.eval_shape(lambda: _models(config, config.seed))
    gen_def, gen_abstract = nnx.split(abstract_gen, nnx.Param)
    disc_def, disc_abstract = nnx.split(abstract_disc, nnx.Param)
    total = config.num_steps
    tx_g = optimizers.make_optimizer(config.optimizer, total)
    # The discriminator's schedule starts (warmup included) when it starts training, at disc_start.
    tx_d = optimizers.make_optimizer(config.optimizer, max(total - config.loss.disc_start, 1),
                           peak=config.optimizer.disc_learning_rate or config.optimizer.learning_rate)
    grid = abstract_gen.grid_size
    setup = Setup(config, mesh, gen_def, disc_def, tx_g, tx_d, tokens_per_batch=config.data.batch_size * grid * grid)

    rules = config.sharding_rules
    param_sh = parallel.state_shardings(gen_abstract, mesh, rules)
    disc_sh = parallel.state_shardings(disc_abstract, mesh, rules)
    opt_g_sh = parallel.optimizer_shardings(tx_g, jax.eval_shape(tx_g.init, gen_abstract.to_pure_dict()), param_sh,
                                            mesh)
    opt_d_sh = parallel.optimizer_shardings(tx_d, jax.eval_shape(tx_d.init, disc_abstract.to_pure_dict()), disc_sh,
                                            mesh)
    rep = parallel.replicated(mesh)
    shardings = dict(step=rep, params=param_sh, disc_params=disc_sh, opt_g=opt_g_sh, opt_d=opt_d_sh, code_ema=rep)

    def init():
        generator, discriminator = _models(config, config.seed)
        params, disc_params = _params(generator), _params(discriminator)
        uniform = setup.tokens_per_batch / config.model.codebook_size
        return dict(step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params,
                    opt_g=tx_g.init(params), opt_d=tx_d.init(disc_params),
                    code_ema=jnp.full((config.model.codebook_size,), uniform, jnp.float32))

    return setup, parallel.init_sharded(init, shardings), shardings


def _generator_terms(setup: Setup, params, disc_params, x, gan_weight_on, dropout_key):
    """Generator loss and its parts; the GAN part uses taming's adaptive weight at the decoder's last layer."""
    cfg = setup.config
    model = nnx.merge(setup.generator, params)
    z_q, indices, aux = model.encode(x, deterministic=False, rngs=jax.random.fold_in(dropout_key, 0))
    h = model.last_layer_input(z_q, deterministic=False, rngs=jax.random.fold_in(dropout_key, 1))
    head_def, head_params = nnx.split(model.decoder.conv_out, nnx.Param)
    head = lambda p, h_in: nnx.merge(head_def, p)(h_in)
    x_rec = head(head_params, h)
    rec = gan_losses.reconstruction_loss(x_rec, x, cfg.loss.reconstruction)
    vq_loss = cfg.loss.codebook_weight * (aux["codebook_loss"] + aux["commitment_loss"])
    terms = dict(reconstruction=rec, codebook=aux["codebook_loss"], commitment=aux["commitment_loss"])
    loss = rec + vq_loss
    if setup.gan_enabled:
        disc = nnx.merge(setup.discriminator, disc_params)
        g_adv = gan_losses.generator_adversarial_loss(disc(x_rec))
        fixed_h, fixed_p = jax.lax.stop_gradient(h), jax.lax.stop_gradient(head_params)
        rec_grad = jax.grad(lambda p: gan_losses.reconstruction_loss(head(p, fixed_h), x, cfg.loss.reconstruction)
                            )(fixed_p)["kernel"]
        adv_grad = jax.grad(lambda p: gan_losses.generator_adversarial_loss(disc(head(p, fixed_h))))(fixed_p)["kernel"]
        weight = gan_losses.adaptive_gan_weight(rec_grad, adv_grad, cfg.loss.disc_weight) * gan_weight_on
        loss = loss + weight * g_adv
        terms.update(generator_adversarial=g_adv, gan_weight=weight)
    return loss, (terms, x_rec, indices, aux["z_e"])


def train_step(setup: Setup, state, batch):
    with setup.activation_sharding():
        return _train_step(setup, state, batch)


def _train_step(setup: Setup, state, batch):
    cfg = setup.config
    step = state["step"]
    # Init draws from fold_in(seed key, 0) and (.., 1); training draws from its own branch, (.., 2).
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 2), step)
    x = gan_losses.to_float(batch["image"])
    gan_on = (step >= cfg.loss.disc_start).astype(jnp.float32)

    grad_fn = jax.value_and_grad(_generator_terms, argnums=1, has_aux=True)
    (loss, (terms, x_rec, indices, z_e)), grads = grad_fn(setup, state["params"], state["disc_params"], x, gan_on,
                                                           jax.random.fold_in(rng, 1))
    updates, opt_g = setup.tx_g.update(grads, state["opt_g"], state["params"])
    params = optax.apply_updates(state["params"], updates)

    metrics = dict(loss=loss, **terms, psnr=jnp.mean(gan_losses.psnr(x_rec, x)),
                   grad_norm=optax.global_norm(grads))
    checked = (loss, grads, updates)
    disc_params, opt_d = state["disc_params"], state["opt_d"]
    if setup.gan_enabled:
        def disc_loss_fn(dp):
            disc = nnx.merge(setup.discriminator, dp)
            return cfg.loss.disc_factor * gan_on * gan_losses.hinge_discriminator_loss(
                disc(x), disc(jax.lax.stop_gradient(x_rec)))
        d_loss, d_grads = jax.value_and_grad(disc_loss_fn)(disc_params)
        d_updates, new_opt_d = setup.tx_d.update(d_grads, opt_d, disc_params)
        # Before disc_start the discriminator and its optimizer (schedule, moments) stay exactly as initialised.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(gan_on > 0, a, b), new, old)
        disc_params = keep(optax.apply_updates(disc_params, d_updates), disc_params)
        opt_d = keep(new_opt_d, opt_d)
        metrics["discriminator"] = d_loss
        checked += (d_loss, d_grads, d_updates)

    K = cfg.model.codebook_size
    restart = cfg.codebook_restart
    counts = vq.code_counts(indices, K).astype(jnp.float32)
    code_ema = restart.decay * state["code_ema"] + (1 - restart.decay) * counts
    if restart.every > 0:
        uniform = setup.tokens_per_batch / K
        due = (step + 1) % restart.every == 0
        codebook = params["quantize"]["embedding"]
        restarted = vq.restart_dead_codes(codebook, code_ema, z_e.reshape(-1, z_e.shape[-1]),
                                          jax.random.fold_in(rng, 2),
                                          restart.threshold * uniform)
        dead = code_ema < restart.threshold * uniform
        params["quantize"]["embedding"] = jnp.where(due, restarted, codebook)
        code_ema = jnp.where(due & dead, uniform, code_ema)
        metrics["dead_codes"] = jnp.sum(dead).astype(jnp.float32)
    metrics["batch_codebook_usage"] = vq.codebook_usage(indices, K)

    new_state = dict(step=step + 1, params=params, disc_params=disc_params, opt_g=opt_g, opt_d=opt_d,
                     code_ema=code_ema)
    # A non-finite loss, gradient or update (of either network) skips the whole step: only `step` advances.
    new_state, metrics["nonfinite"] = finite_updates.keep_if_finite(
        finite_updates.all_finite(*checked), new_state, dict(state, step=step + 1))
    return new_state, metrics


def eval_step(setup: Setup, params, batch):
    """Per-batch sums for evaluation: reconstruction loss, PSNR, code counts, and the reconstructions."""
    with setup.activation_sharding():
        return _eval_step(setup, params, batch)


def _eval_step(setup: Setup, params, batch):
    model = nnx.merge(setup.generator, params)
    x = gan_losses.to_float(batch["image"])
    x_rec, aux = model(x)
    return dict(
        reconstruction=gan_losses.reconstruction_loss(x_rec, x, setup.config.loss.reconstruction),
        psnr_sum=jnp.sum(gan_losses.psnr(x_rec, x)),
        counts=vq.code_counts(aux["indices"], setup.config.model.codebook_size),
        reconstructions=gan_losses.to_uint8(x_rec),
        indices=aux["indices"],
    )
