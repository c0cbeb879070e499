"""How every trainer's run begins and ends, written once.

Begin: resume from the newest training checkpoint (or take a new run's first parameters from imported weights or
`config.init_from`, or keep the freshly built state), then open the metrics writer, forgetting any metrics logged
after the restored step. End: a run that reached its last step evaluates once more on its final split, logs the
figures as `test/*` and writes them to `test_metrics.json`; one that stopped early (`stop_after`, SIGTERM, SIGINT)
just closes its writer, and a later call resumes it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax

from dalle_jax import storage
from dalle_jax.trainers import init_from
from dalle_jax.training import checkpointing, loop, metrics as metrics_lib

TEST_METRICS_FILE = "test_metrics.json"


@dataclasses.dataclass
class Begun:
    state: Any
    step: int  # the step `state` has trained to
    checkpointer: checkpointing.Checkpointer
    writer: metrics_lib.MetricsWriter


def begin(config, workdir: str, state, shardings, cadence: loop.Cadence, *, data_iterator=None,
          first_params: init_from.Start | None = None) -> Begun | None:
    """The state to train from, its step, the checkpointer and the metrics writer; None when this invocation has
    nothing to do (a `stop_after` at or before the restored step)."""
    checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                              save_every=config.checkpoint_every)
    if first_params is not None:  # no training checkpoint yet: start from imported weights or config.init_from's
        state, step = init_from.load_params(first_params, state, shardings)
    else:
        state, step = checkpointing.restore_or_keep(checkpointer, state, shardings, data_iterator,
                                                    fall_back=config.faults.restore_fallback)
    if step >= cadence.last_step and not cadence.finishes_run:
        checkpointer.close()
        return None
    writer = metrics_lib.MetricsWriter(workdir)
    writer.drop_after(step)
    return Begun(state, step, checkpointer, writer)


def end(config, workdir: str, writer: metrics_lib.MetricsWriter, last_trained: int,
        final_figures: Callable[[], tuple[dict, str]]) -> dict | None:
    """The final figures, once the run has trained all `config.num_steps` steps (None before): `final_figures()`
    gives them and the split they were measured on."""
    if last_trained < config.num_steps:
        writer.close()
        return None
    figures, split = final_figures()
    writer.write_scalars(config.num_steps, {f"test/{k}": v for k, v in figures.items()})
    writer.close()
    if jax.process_index() == 0:
        with storage.open(storage.join(workdir, TEST_METRICS_FILE), "w") as f:
            json.dump({"step": config.num_steps, "split": split, **figures}, f, indent=2)
    return figures
