"""grain input pipelines: per-process shards, seeded shuffling, checkpointable iterators, global batches.

Training: process p reads the p-th block of each global batch of one shuffled stream, so processes never overlap
and a global batch holds the same examples in the same rows whatever the number of processes. Evaluation: each
process reads every `process_count`-th example. The iterator's position is part of every checkpoint, so a resumed
run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping

import grain
import jax
import numpy as np

Example = Mapping[str, object]
# Key under which a random transform finds the example's position in the endless training stream (the global batch
# it lands in is `position // global_batch`).
STREAM_INDEX = "stream_index"
Transform = Callable[[Example], dict]
RandomTransform = Callable[[Example, np.random.Generator], dict]


def as_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def per_process_batch(global_batch: int, field: str = "config.data.batch_size") -> int:
    if global_batch % jax.process_count():
        raise ValueError(f"{field}={global_batch} is not divisible by the {jax.process_count()} processes; use a "
                         "multiple of the process count.")
    return global_batch // jax.process_count()


def _process_shard(source) -> grain.MapDataset:
    return grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]


def train_iterator(source, transform: Transform | None, *, global_batch: int, seed: int, read_threads: int = 2,
                   prefetch: int = 4, random_transform: RandomTransform | None = None) -> grain.DatasetIterator:
    """An endless, reshuffled-every-epoch iterator of this process's share of each global batch.

    `random_transform(example, rng)` (instead of `transform`) draws from a generator seeded by `seed` and the
    example's position in the endless stream, so its choices differ every epoch yet replay exactly on resume; the
    example carries that position under STREAM_INDEX.
    """
    if (transform is None) == (random_transform is None):
        raise ValueError("train_iterator takes exactly one of transform and random_transform.")
    local_batch = per_process_batch(global_batch)
    if len(source) < global_batch:
        raise ValueError(f"The training split has {len(source)} examples, fewer than the {global_batch} examples "
                         "of one batch; lower config.data.batch_size or use more data.")
    # One shuffled, transformed stream cut into blocks of `local_batch`; global batch b is blocks bP .. bP+P-1 and
    # process p reads block bP+p (lazily: only its own examples). The global batches, their row order and every
    # random draw are then the same for 1 process or many, so multi-host runs reproduce single-host ones.
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    if transform is not None:
        ds = ds.map(transform)
    else:
        ds = ds.map_with_index(lambda index, example: {**example, STREAM_INDEX: index})
        ds = ds.random_map(random_transform, seed=seed + 1)
    ds = ds.batch(local_batch, drop_remainder=True)[jax.process_index()::jax.process_count()]
    options = grain.ReadOptions(num_threads=max(read_threads, 0), prefetch_buffer_size=max(prefetch, 0))
    return iter(ds.to_iter_dataset(options))


def eval_batches(source, transform: Transform, *, global_batch: int, num_batches: int = -1,
                 read_threads: int = 2) -> Iterator[dict]:
    """This process's share of the first `num_batches` full global batches of a split, in order (-1: all)."""
    local_batch = per_process_batch(global_batch, "config.data.eval_batch_size")
    # Counted on the whole split, so every process runs the same number of (collective) eval steps.
    available = len(source) // global_batch
    count = available if num_batches < 0 else min(num_batches, available)
    if count == 0:
        raise ValueError(f"The evaluation split has {len(source)} examples, fewer than one batch of "
                         f"{global_batch}; lower config.data.eval_batch_size.")
    ds = _process_shard(source)
    ds = ds[: count * local_batch].map(transform).batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(read_threads, 0), prefetch_buffer_size=2)))


def image_transform(image_key: str, image_size: int) -> Transform:
    """Keeps just the image, checking that it is the size the model is built for."""
    def transform(example: Example) -> dict:
        image = np.asarray(example[image_key])
        if image.shape != (image_size, image_size, 3) or image.dtype != np.uint8:
            raise ValueError(f"Image feature {image_key!r} has shape {image.shape} and dtype {image.dtype}; the "
                             f"model needs uint8 ({image_size}, {image_size}, 3). Set config.data.image_size to "
                             "the dataset's size or prepare the dataset at the model's size.")
        return {"image": image}
    return transform


def caption_and_codes(tokenizer, text_length: int, *, random_caption: bool, canonical_prob: float = 0.0,
                      train_caption: Callable[[Example], str | None] | None = None):
    """Transform of image-token records into `text_ids` + `codes`. Training (`random_caption`) tokenizes the
    example's first (canonical) caption with probability `canonical_prob`, and otherwise one of all its captions
    chosen by the generator; evaluation always the canonical one. A training example for which `train_caption`
    (an extension's, see `dalle_jax/extensions.py`) gives a caption takes that one instead, without a draw."""
    if not 0.0 <= canonical_prob <= 1.0:
        raise ValueError(f"config.data.canonical_caption_prob={canonical_prob} must be in [0, 1].")

    def tokenize(example: Example, caption: str) -> dict:
        return {"text_ids": tokenizer.encode(caption, text_length), "codes": np.asarray(example["codes"], np.int32)}

    def random_one(example: Example, rng: np.random.Generator) -> dict:
        override = train_caption(example) if train_caption is not None else None
        if override is not None:
            return tokenize(example, override)
        captions = example["captions"]
        canonical = canonical_prob > 0 and rng.random() < canonical_prob  # no extra draw when off
        index = 0 if canonical else rng.integers(len(captions))
        return tokenize(example, captions[index])

    return random_one if random_caption else (lambda example: tokenize(example, example["captions"][0]))
