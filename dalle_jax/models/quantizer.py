"""Vector quantisation of encoder outputs: nearest-code lookup, straight-through gradients, VQ losses, and the
pure codebook statistics and dead-code restart the VQGAN trainer uses.

Losses (`sg` = stop_gradient, z = encoder output, e = its nearest code):
  codebook_loss   = mean((sg(z) - e)^2)          -> moves codes towards the encoder outputs;
  commitment_loss = beta * mean((z - sg(e))^2)   -> keeps the encoder close to its codes (beta on this term).
With `l2_normalize`, z and the codebook are l2-normalised before the lookup and the losses (cosine distance),
and the normalised codes are what the decoder receives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

CODEBOOK_AXES = ("codebook", "code")


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), 1e-12))


def nearest_code(z_flat: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row (squared distance) for each row of `z_flat`, as int32 (N,).

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; the first term does not change the argmin, so only the (N, K)
    matrix of the other two is formed, never an (N, K, D) difference tensor.
    """
    # Full float32 matmul precision: with TPU's default bf16 passes, near-ties would pick the wrong code.
    dots = jnp.matmul(z_flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
    scores = jnp.sum(jnp.square(codebook), axis=-1)[None, :] - 2.0 * dots
    return jnp.argmin(scores, axis=-1).astype(jnp.int32)


def _uniform_codebook_init(key, shape, dtype=jnp.float32):
    bound = 1.0 / shape[0]
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class VectorQuantizer(nnx.Module):
    """Codebook of `codebook_size` vectors of dimension `embed_dim`, the parameter `embedding`."""

    def __init__(self, codebook_size: int, embed_dim: int, *, beta: float = 0.25, l2_normalize: bool = False,
                 rngs: nnx.Rngs):
        if codebook_size <= 0 or embed_dim <= 0:
            raise ValueError(f"codebook_size={codebook_size} and embed_dim={embed_dim} must both be positive.")
        if beta < 0:
            raise ValueError(f"beta={beta} (commitment weight) must be >= 0; taming-style models use 0.25.")
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = float(beta)
        self.l2_normalize = bool(l2_normalize)
        init = nnx.with_partitioning(_uniform_codebook_init, CODEBOOK_AXES)
        self.embedding = nnx.Param(init(rngs.params(), (codebook_size, embed_dim), jnp.float32))

    def codebook(self) -> jax.Array:
        """The codebook in the space codes are compared and decoded in (l2-normalised in that mode)."""
        table = self.embedding[...]
        return l2_normalize(table) if self.l2_normalize else table

    def codes(self, indices: jax.Array) -> jax.Array:
        """Code vectors for integer indices of any shape: (...,) -> (..., embed_dim)."""
        if not jnp.issubdtype(jnp.asarray(indices).dtype, jnp.integer):
            raise TypeError(f"Code indices must be integers; got dtype {jnp.asarray(indices).dtype}.")
        return jnp.take(self.codebook(), indices, axis=0)

    def __call__(self, z: jax.Array):
        """Quantises z (..., embed_dim) -> (z_q, indices, aux).

        z_q carries the straight-through estimator: its forward value is the nearest code, its gradient passes
        to z unchanged. aux holds `codebook_loss`, `commitment_loss` (scalar means) and `z_e`, z in the space
        compared with the codes.
        """
        if z.shape[-1] != self.embed_dim:
            raise ValueError(
                f"Quantizer input has {z.shape[-1]} channels in its last axis (shape {z.shape}) but the codebook "
                f"has embed_dim={self.embed_dim}.")
        z = z.astype(jnp.float32)
        if self.l2_normalize:
            z = l2_normalize(z)
        codebook = self.codebook()
        indices = nearest_code(z.reshape(-1, self.embed_dim), jax.lax.stop_gradient(codebook))
        indices = indices.reshape(z.shape[:-1])
        z_q = jnp.take(codebook, indices, axis=0)
        aux = {
            "codebook_loss": jnp.mean(jnp.square(jax.lax.stop_gradient(z) - z_q)),
            "commitment_loss": self.beta * jnp.mean(jnp.square(z - jax.lax.stop_gradient(z_q))),
            "z_e": z,
        }
        z_q_st = z + jax.lax.stop_gradient(z_q - z)
        return z_q_st, indices, aux


def code_counts(indices: jax.Array, codebook_size: int) -> jax.Array:
    """How many times each code occurs in `indices` (any shape), float32 (codebook_size,)."""
    return jnp.bincount(jnp.ravel(indices), length=codebook_size).astype(jnp.float32)


def codebook_usage(indices: jax.Array, codebook_size: int) -> jax.Array:
    """Fraction of the codebook that occurs at least once in `indices`."""
    return jnp.mean(code_counts(indices, codebook_size) > 0)


def codebook_perplexity(indices: jax.Array, codebook_size: int) -> jax.Array:
    """exp(entropy) of the code frequencies in `indices`: k when k codes are used equally often."""
    return perplexity_from_counts(code_counts(indices, codebook_size))


def perplexity_from_counts(counts: jax.Array) -> jax.Array:
    """exp(entropy) of the frequencies given by per-code counts (e.g. summed over an evaluation set)."""
    counts = jnp.asarray(counts, jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)


def restart_dead_codes(codebook: jax.Array, usage_counts: jax.Array, z_e_flat: jax.Array, rng: jax.Array,
                       threshold) -> jax.Array:
    """Replaces every code whose usage count is below `threshold` with a randomly chosen encoder output.

    codebook (K, D); usage_counts (K,), e.g. an EMA of `code_counts`; z_e_flat (N, D) encoder outputs of the
    batch in the space compared with codes (`aux["z_e"]` flattened). Replacements are drawn without repetition
    when N >= K. Pure and jit-able; live codes are returned unchanged.
    """
    if codebook.ndim != 2 or z_e_flat.ndim != 2 or codebook.shape[1] != z_e_flat.shape[1]:
        raise ValueError(
            f"restart_dead_codes needs codebook (K, D) and z_e_flat (N, D) with the same D; got codebook "
            f"{codebook.shape} and z_e_flat {z_e_flat.shape}. Flatten z_e with z_e.reshape(-1, D).")
    if usage_counts.shape != codebook.shape[:1]:
        raise ValueError(f"usage_counts has shape {usage_counts.shape}; expected ({codebook.shape[0]},), one "
                         f"count per code.")
    k, n = codebook.shape[0], z_e_flat.shape[0]
    if n >= k:
        picks = jax.random.permutation(rng, n)[:k]
    else:
        picks = jax.random.randint(rng, (k,), 0, n)
    replacements = jax.lax.stop_gradient(z_e_flat[picks]).astype(codebook.dtype)
    dead = usage_counts < threshold
    return jnp.where(dead[:, None], replacements, codebook)
