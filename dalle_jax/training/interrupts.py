"""Stop requests from outside the process: SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C).

While a `StopRequests` is active, either signal only records that a stop was asked for; the training loop asks
`requested(step)` after every step, checkpoints that step and returns. The first signal also puts the previous
handler back, so a second one (a stuck run, an impatient user) acts as it normally would.

On several processes a signal reaches each host at its own moment, so local flags would stop the hosts at different
steps and hang their collectives. There the stop comes only from JAX's preemption sync point (SIGTERM to any host,
propagated by the distributed runtime), which all processes reach at the same step; no local handler is installed.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager; `reached_sync_point(step)` is the multi-process preemption check (orbax's
    `CheckpointManager.reached_preemption`), called at every step as the distributed runtime requires."""

    def __init__(self, reached_sync_point: Callable[[int], bool]):
        self._reached_sync_point = reached_sync_point
        self._previous: dict[int, object] = {}
        self.received: str | None = None  # name of the signal that asked for the stop

    def __enter__(self) -> "StopRequests":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum))
        logging.warning("Received %s: finishing the current step, then checkpointing it and stopping.", self.received)

    def requested(self, step: int) -> bool:
        if self.received is None and self._reached_sync_point(step):
            self.received = "preemption sync point"
        return self.received is not None
