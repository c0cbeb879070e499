"""Where a run's numbers and pictures go: TensorBoard (clu), the log, and `workdir/metrics.jsonl`.

Only process 0 writes; the other processes compute the same numbers and keep quiet.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np
from clu import metric_writers
from PIL import Image


def _plain(value):
    value = np.asarray(value).item() if np.ndim(value) == 0 else value
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


class MetricsWriter:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.is_main)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")

    def drop_after(self, step: int) -> None:
        """Forgets lines logged after `step`: a resumed run logs those steps again."""
        if not self.is_main or not os.path.exists(self.jsonl_path):
            return
        kept = [line for line in read_metrics(self.workdir) if line["step"] <= step]
        with open(self.jsonl_path, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in kept)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, scalars)
        if self.is_main:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}) + "\n")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each value is one uint8 (H, W, 3) picture; it goes to TensorBoard and `samples/NAME_STEP.png`."""
        self.writer.write_images(step, {k: np.asarray(v)[None] for k, v in images.items()})
        if self.is_main:
            os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
            for name, image in images.items():
                path = os.path.join(self.workdir, "samples", f"{name.replace('/', '_')}_{step:07d}.png")
                Image.fromarray(np.asarray(image)).save(path)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(workdir: str) -> list[dict]:
    """All lines of `metrics.jsonl`, oldest first."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
