"""The training loop both trainers share: step, log a window of metrics, evaluate, checkpoint.

A trainer builds its state, compiled step and evaluation, then hands them to `run`; the cadence (log, eval,
checkpoint, stop) and the bookkeeping around it live here once, with the two ways a run ends early:
- a stop request (SIGTERM, SIGINT, or on several processes JAX's preemption sync point): the current step is
  checkpointed and `run` returns normally, so the process exits cleanly and the next run resumes there;
- `max_consecutive_nonfinite` skipped updates in a row (the steps skip non-finite updates themselves): `run`
  raises `NonFiniteTraining`, leaving the newest checkpoint (the last good state) as it is.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dalle_jax.training.checkpointing import Checkpointer
from dalle_jax.training.interrupts import StopRequests
from dalle_jax.training.metrics import MetricsWriter
from dalle_jax.training.progress import Progress


@dataclasses.dataclass(frozen=True)
class Cadence:
    num_steps: int  # last step of the run
    log_every: int  # steps per logged window of train metrics
    eval_every: int  # steps between evaluations (the last step is always evaluated)
    stop_after: int | None = None  # end this invocation after checkpointing this step
    max_consecutive_nonfinite: int = 10  # skipped (non-finite) updates in a row that end the run

    @classmethod
    def from_config(cls, config, stop_after: int | None = None) -> "Cadence":
        for field in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
            if int(config[field]) < 1:
                raise ValueError(f"config.{field}={config[field]} must be a positive number of steps.")
        limit = int(config.faults.max_consecutive_nonfinite)
        if limit < 1:
            raise ValueError(f"config.faults.max_consecutive_nonfinite={limit} must be at least 1 (the number of "
                             "skipped non-finite updates in a row that stops training), e.g. 10.")
        return cls(int(config.num_steps), int(config.log_every), int(config.eval_every), stop_after, limit)

    @property
    def last_step(self) -> int:
        return self.num_steps if self.stop_after is None else min(self.stop_after, self.num_steps)

    @property
    def finishes_run(self) -> bool:
        return self.last_step == self.num_steps


class NonFiniteTraining(RuntimeError):
    """Too many updates in a row had a non-finite loss, gradient or result."""


def mean_metrics(step_metrics: list[Mapping[str, Any]]) -> dict[str, float]:
    """Means over the steps whose update was applied (all steps if none was), and `nonfinite_steps`: how many
    of the window's updates were skipped."""
    fetched = jax.device_get(step_metrics)
    applied = [m for m in fetched if not m.get("nonfinite", 0.0)] or fetched
    figures = {k: float(np.mean([m[k] for m in applied])) for k in fetched[0] if k != "nonfinite"}
    if "nonfinite" in fetched[0]:
        figures["nonfinite_steps"] = float(sum(m["nonfinite"] for m in fetched))
    return figures


def run(state, *, start: int, cadence: Cadence, train_step: Callable, next_batch: Callable[[], Any],
        evaluate: Callable[[Any, int], None], checkpointer: Checkpointer, data_iterator, writer: MetricsWriter,
        progress: Progress, rates: Callable[[int, float], Mapping[str, float]], shown: Mapping[str, str]):
    """Trains from step `start + 1` to `cadence.last_step`; returns the final state and the last step trained,
    which is earlier when a stop was requested (that step is checkpointed).

    `rates(steps, seconds)` adds throughput figures to each logged window; `shown` maps progress-bar labels to
    train metric names. `evaluate(state, step)` writes its own figures.
    """
    pending, window_start = [], time.perf_counter()
    skipped_in_a_row, step = 0, start
    with StopRequests(checkpointer.reached_preemption) as stop_requests:
        for step in range(start + 1, cadence.last_step + 1):
            state, step_metrics = train_step(state, next_batch())
            pending.append(step_metrics)
            progress.advance()
            # Waiting for this one scalar costs the host a step of look-ahead (~1 ms), not the device's time.
            skipped_in_a_row = skipped_in_a_row + 1 if float(step_metrics.get("nonfinite", 0.0)) else 0
            too_many_skips = skipped_in_a_row >= cadence.max_consecutive_nonfinite
            stopping = stop_requests.requested(step)
            if step % cadence.log_every == 0 or step == cadence.last_step or stopping or too_many_skips:
                figures = mean_metrics(pending)
                figures.update(rates(len(pending), time.perf_counter() - window_start))
                writer.write_scalars(step, {f"train/{k}": v for k, v in figures.items()})
                progress.show({label: figures[key] for label, key in shown.items() if key in figures})
                pending, window_start = [], time.perf_counter()
            if too_many_skips:
                progress.close()
                checkpointer.wait()
                newest = checkpointer.latest_step()
                checkpointer.close()
                writer.flush()
                raise NonFiniteTraining(
                    f"Steps {step - skipped_in_a_row + 1}-{step}: {skipped_in_a_row} updates in a row had a non-finite "
                    f"loss, gradient or update and were skipped (config.faults.max_consecutive_nonfinite="
                    f"{cadence.max_consecutive_nonfinite}), so training stopped. The newest checkpoint "
                    f"({'none' if newest is None else f'step {newest}'} in {checkpointer.directory}) holds the last "
                    "good state. Lower config.optimizer.learning_rate or check the data, then run the same command "
                    "to resume.")
            if (step % cadence.eval_every == 0 and not stopping) or step == cadence.num_steps:
                evaluate(state, step)
                window_start = time.perf_counter()
            checkpointer.save(step, state, data_iterator, force=step == cadence.last_step or stopping)
            if stopping:
                logging.warning("Stopped at step %d (%s) with a checkpoint of it in %s; run the same command to "
                                "resume from there.", step, stop_requests.received, checkpointer.directory)
                break
    progress.close()
    checkpointer.close()
    return state, step
