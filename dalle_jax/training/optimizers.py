"""Learning-rate schedules and optimizers built from a config's `optimizer` block."""
from __future__ import annotations

import optax


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


def adam(opt_cfg, total_steps: int, peak: float | None = None) -> optax.GradientTransformation:
    """AdamW with warmup + decay and optional global-norm clipping."""
    schedule = learning_rate_schedule(opt_cfg.learning_rate if peak is None else peak, opt_cfg.warmup_steps,
                                      total_steps, opt_cfg.schedule)
    parts = [optax.clip_by_global_norm(opt_cfg.grad_clip)] if opt_cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay))
    return optax.chain(*parts)
