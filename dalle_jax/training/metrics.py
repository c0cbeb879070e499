"""Where a run's numbers and pictures go: TensorBoard event files, the log, and `workdir/metrics.jsonl`.

Only process 0 writes and logs; the other processes compute the same numbers and keep quiet.

The event file is written with TensorBoard's own protocol buffers and record framing, straight to a local file.
TensorBoard's and clu's writers open files through TensorFlow, whose import is about 5 s of every run's start.

A work directory in a bucket (gs://, s3://) cannot be appended to: `metrics.jsonl` is uploaded whole after each
logged step, and the event file is written on local scratch and uploaded on flush, on close and at most every
`EVENTS_UPLOAD_SECONDS` while training.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import time
from typing import Mapping

import jax
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from dalle_jax import storage

EVENTS_UPLOAD_SECONDS = 60.0


def _plain(value):
    value = np.asarray(value).item() if np.ndim(value) == 0 else value
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class EventFile:
    """One TensorBoard event file (`events.out.tfevents.*`) in `logdir`, with scalars and PNG images."""

    def __init__(self, logdir: str):
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = storage.join(logdir, name)
        local_dir = storage.staging_dir(logdir) if storage.is_remote(logdir) else logdir
        os.makedirs(local_dir, exist_ok=True)
        self.local_path = os.path.join(local_dir, name)
        self.uploaded = time.monotonic()
        self._records = RecordWriter(open(self.local_path, "wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))

    def image(self, step: int, tag: str, png: bytes, height: int, width: int, channels: int) -> None:
        picture = summary_pb2.Summary.Image(height=height, width=width, colorspace=channels,
                                            encoded_image_string=png)
        value = summary_pb2.Summary.Value(tag=tag, image=picture)
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[value])))

    def flush(self) -> None:
        self._records.flush()
        if self.local_path != self.path:
            storage.copyfile(self.local_path, self.path)
            self.uploaded = time.monotonic()

    def close(self) -> None:
        self.flush()
        self._records.close()


class MetricsWriter:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        self.events = EventFile(workdir) if self.is_main else None
        self.jsonl_path = storage.join(workdir, "metrics.jsonl")
        self._remote_lines = None  # a bucket's metrics.jsonl, kept here and uploaded whole on each write

    def drop_after(self, step: int) -> None:
        """Forgets lines logged after `step`, and the final `test/` figures of `step`: a resumed run logs those steps
        again, and a finished run called again evaluates its test split again."""
        if not self.is_main or not storage.exists(self.jsonl_path):
            return
        kept = [line for line in read_metrics(self.workdir)
                if line["step"] < step or (line["step"] == step and not any(k.startswith("test/") for k in line))]
        if storage.is_remote(self.jsonl_path):
            self._remote_lines = [json.dumps(line) + "\n" for line in kept]
            storage.write_atomic(self.jsonl_path, "".join(self._remote_lines))
            return
        with open(self.jsonl_path, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in kept)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.is_main:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))
        self.events.scalars(int(step), scalars)
        line = json.dumps({"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}) + "\n"
        if not storage.is_remote(self.jsonl_path):
            with open(self.jsonl_path, "a") as f:
                f.write(line)
            return
        if self._remote_lines is None:
            self._remote_lines = ([json.dumps(old) + "\n" for old in read_metrics(self.workdir)]
                                  if storage.exists(self.jsonl_path) else [])
        self._remote_lines.append(line)
        storage.write_atomic(self.jsonl_path, "".join(self._remote_lines))
        if time.monotonic() - self.events.uploaded > EVENTS_UPLOAD_SECONDS:
            self.events.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each value is one uint8 (H, W, 3) picture; it goes to TensorBoard and `samples/NAME_STEP.png`."""
        if not self.is_main:
            return
        storage.makedirs(storage.join(self.workdir, "samples"))
        for name, image in images.items():
            image = np.asarray(image)
            png = _png_bytes(image)
            self.events.image(int(step), name, png, *image.shape)
            path = storage.join(self.workdir, "samples", f"{name.replace('/', '_')}_{step:07d}.png")
            with storage.open(path, "wb") as f:
                f.write(png)

    def flush(self) -> None:
        if self.is_main:
            self.events.flush()

    def close(self) -> None:
        if self.is_main:
            self.events.close()


def read_metrics(workdir: str) -> list[dict]:
    """All lines of `metrics.jsonl`, oldest first."""
    with storage.open(storage.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
