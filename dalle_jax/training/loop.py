"""The training loop both trainers share: step, log a window of metrics, evaluate, checkpoint.

A trainer builds its state, compiled step and evaluation, then hands them to `run`; the cadence (log, eval,
checkpoint, stop) and the bookkeeping around it live here once.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dalle_jax.training.checkpointing import Checkpointer
from dalle_jax.training.metrics import MetricsWriter
from dalle_jax.training.progress import Progress


@dataclasses.dataclass(frozen=True)
class Cadence:
    num_steps: int  # last step of the run
    log_every: int  # steps per logged window of train metrics
    eval_every: int  # steps between evaluations (the last step is always evaluated)
    stop_after: int | None = None  # end this invocation after checkpointing this step

    @classmethod
    def from_config(cls, config, stop_after: int | None = None) -> "Cadence":
        for field in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
            if int(config[field]) < 1:
                raise ValueError(f"config.{field}={config[field]} must be a positive number of steps.")
        return cls(int(config.num_steps), int(config.log_every), int(config.eval_every), stop_after)

    @property
    def last_step(self) -> int:
        return self.num_steps if self.stop_after is None else min(self.stop_after, self.num_steps)

    @property
    def finishes_run(self) -> bool:
        return self.last_step == self.num_steps


def mean_metrics(step_metrics: list[Mapping[str, Any]]) -> dict[str, float]:
    fetched = jax.device_get(step_metrics)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def run(state, *, start: int, cadence: Cadence, train_step: Callable, next_batch: Callable[[], Any],
        evaluate: Callable[[Any, int], None], checkpointer: Checkpointer, data_iterator, writer: MetricsWriter,
        progress: Progress, rates: Callable[[int, float], Mapping[str, float]], shown: Mapping[str, str]):
    """Trains from step `start + 1` to `cadence.last_step`; returns the final state.

    `rates(steps, seconds)` adds throughput figures to each logged window; `shown` maps progress-bar labels to
    train metric names. `evaluate(state, step)` writes its own figures.
    """
    pending, window_start = [], time.perf_counter()
    for step in range(start + 1, cadence.last_step + 1):
        state, step_metrics = train_step(state, next_batch())
        pending.append(step_metrics)
        progress.advance()
        if step % cadence.log_every == 0 or step == cadence.last_step:
            figures = mean_metrics(pending)
            figures.update(rates(len(pending), time.perf_counter() - window_start))
            writer.write_scalars(step, {f"train/{k}": v for k, v in figures.items()})
            progress.show({label: figures[key] for label, key in shown.items() if key in figures})
            pending, window_start = [], time.perf_counter()
        if step % cadence.eval_every == 0 or step == cadence.num_steps:
            evaluate(state, step)
            window_start = time.perf_counter()
        checkpointer.save(step, state, data_iterator, force=step == cadence.last_step)
    progress.close()
    checkpointer.close()
    return state
