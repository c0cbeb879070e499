"""Losses of adversarial image-tokenizer training, and the image-quality figures reported alongside them."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def reconstruction_loss(x_rec: jax.Array, x: jax.Array, kind: str) -> jax.Array:
    if kind == "l1":
        return jnp.mean(jnp.abs(x_rec - x))
    if kind == "l2":
        return jnp.mean(jnp.square(x_rec - x))
    raise ValueError(f"config.loss.reconstruction={kind!r}; use 'l1' or 'l2'.")


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    return -jnp.mean(logits_fake)


def adaptive_gan_weight(rec_grad: jax.Array, gan_grad: jax.Array, scale: float) -> jax.Array:
    """Balances the GAN term against reconstruction by their gradient norms at the decoder's last layer."""
    weight = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, 1e4) * scale)


def psnr(x_rec: jax.Array, x: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale after clipping."""
    mse = jnp.mean(jnp.square((jnp.clip(x_rec, -1, 1) - x) / 2.0), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def to_uint8(x: jax.Array) -> jax.Array:
    return jnp.round((jnp.clip(x, -1, 1) + 1.0) * 127.5).astype(jnp.uint8)


def to_float(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 127.5 - 1.0
