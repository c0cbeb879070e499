"""Skipping updates that are not finite: a NaN or infinite loss, gradient or update leaves the state as it was.

Both trainers' steps end with `keep_if_finite`, so one bad batch (or a learning-rate spike) costs one step instead
of the run; the step's `nonfinite` metric (1.0 when skipped) lets the loop count skips in a row and stop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def all_finite(*trees) -> jax.Array:
    """True when every element of every array in `trees` is finite (judged by their global norm, which the step
    computes anyway for the gradients: a reduction per array, where a stack of per-array checks made XLA's CPU
    compiler take minutes)."""
    return jnp.isfinite(optax.global_norm(trees))


def keep_if_finite(finite: jax.Array, new_state, old_state):
    """`new_state` where `finite`, else `old_state` (same structure); returns it with the `nonfinite` flag."""
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
    return state, 1.0 - finite.astype(jnp.float32)
