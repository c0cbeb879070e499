"""A progress bar for the training loop: step, ETA and the latest figures (process 0 only)."""
from __future__ import annotations

import sys
from typing import Mapping

import jax
from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, initial: int, description: str):
        self.bar = tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
                        disable=jax.process_index() != 0, file=sys.stderr, mininterval=1.0)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def show(self, figures: Mapping[str, float]) -> None:
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
