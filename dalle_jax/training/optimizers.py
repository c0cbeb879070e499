"""Learning-rate schedules and optimizers built from a config's `optimizer` block."""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("adamw", "adafactor")


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, kind: str) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=0.1)
    elif kind == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"config.optimizer.schedule={kind!r}; use 'cosine', 'linear' or 'constant'.")
    return optax.join_schedules([warmup, after], [max(warmup_steps, 1)])


FROZEN = ("code_features",)  # parameters no update may change (their gradient is zero; decay must spare them too)


def _decays(params):
    """Weight decay applies to matrices (kernels, embeddings), never to norm scales, biases or frozen tables."""
    def decays(path, p):
        return p.ndim >= 2 and not any(getattr(k, "key", None) in FROZEN for k in path)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg, total_steps: int, peak: float | None = None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW or Adafactor on a warmup + decay schedule peaking at `peak`
    (default `opt_cfg.learning_rate`)."""
    schedule = learning_rate_schedule(opt_cfg.learning_rate if peak is None else peak, opt_cfg.warmup_steps,
                                      total_steps, opt_cfg.schedule)
    name = opt_cfg.name
    parts = [optax.clip_by_global_norm(opt_cfg.grad_clip)] if opt_cfg.grad_clip > 0 else []
    if name == "adamw":
        parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay,
                                 mask=_decays))
    elif name == "adafactor":
        # Factored second moments (row and column statistics) instead of one per parameter; no first moment
        # unless b1 > 0. The schedule gives absolute step sizes, as for AdamW.
        parts.append(optax.adafactor(schedule, multiply_by_parameter_scale=False, clipping_threshold=None,
                                     momentum=opt_cfg.b1 or None, weight_decay_rate=opt_cfg.weight_decay or None,
                                     weight_decay_mask=_decays))
    else:
        raise ValueError(f"config.optimizer.name={name!r} is not an optimizer; use one of {OPTIMIZERS}.")
    return optax.chain(*parts)
