"""Cross-entropy over image tokens with label smoothing and z-loss, aware of the padded output vocabulary.

Only the first `num_classes` logit columns are real classes; the padding columns beyond them are dropped
before the softmax, so they get neither probability nor label-smoothing mass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def image_token_loss(logits: jax.Array, targets: jax.Array, *, num_classes: int, label_smoothing: float = 0.0,
                     z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over all tokens of the smoothed cross-entropy plus `z_loss * logsumexp(logits)**2`.

    logits: (..., V) with V >= num_classes; targets: (...) int ids in [0, num_classes).
    Returns (loss, metrics) with metrics `loss` (the total), `cross_entropy`, `z_loss` (the weighted
    z term that was added) and `token_accuracy`.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits shape {logits.shape} does not match targets shape {targets.shape}; logits must "
                         f"be targets.shape + (vocab,).")
    if not 0 < num_classes <= logits.shape[-1]:
        raise ValueError(f"num_classes={num_classes} must be in [1, {logits.shape[-1]}] (the logits' last dim).")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1).")
    if z_loss < 0.0:
        raise ValueError(f"z_loss={z_loss} must be >= 0.")
    logits = logits[..., :num_classes].astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    soft_targets = (jax.nn.one_hot(targets, num_classes, dtype=jnp.float32) * (1.0 - label_smoothing)
                    + label_smoothing / num_classes)
    cross_entropy = jnp.mean(-jnp.sum(soft_targets * log_probs, axis=-1))
    z_term = z_loss * jnp.mean(jnp.square(log_z))
    loss = cross_entropy + z_term
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return loss, {"loss": loss, "cross_entropy": cross_entropy, "z_loss": z_term, "token_accuracy": accuracy}
