"""The caption model's examples: a seq2seq run's encoded records, decoded to pixels (or kept as codes, for a model
that reads code features), with their captions tokenized.

Training on the VQGAN's reconstructions rather than the dataset's own pixels shows the model pictures as the
sampler makes them. Each step's batch is drawn from (seed, step) alone, so a resumed run sees what an unbroken one
would without any iterator state.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from tqdm.auto import tqdm

from dalle_jax.data import text as text_lib, token_records
from dalle_jax import runs, storage


@dataclasses.dataclass(frozen=True)
class CaptionedPictures:
    images: np.ndarray  # uint8 (N, H, W, 3) pictures, or int32 (N, image_length) codes when not decoded
    captions: np.ndarray  # int32 (N, C, text_length): each record's captions, the first repeated to fill C
    caption_counts: np.ndarray  # int32 (N,): how many of the C rows are distinct captions
    # int32 (N, T, text_length): a record's canonical caption, then captions that differ from it only in which
    # object is which (its twins), from an extension's `contrast_captions` hook; T is at least 1.
    twins: np.ndarray
    twin_rows: np.ndarray  # bool (N, T): which twins exist (all False for records without twins)

    @functools.cached_property
    def longest_caption(self) -> int:
        """Ids in the longest caption, `<s>` and `</s>` included: training batches are cut to it, as the padding
        beyond changes no score and costs a fifth of a step on the shapes captions (33 of 40)."""
        return int((self.captions != text_lib.PAD_ID).sum(axis=-1).max())

    def __len__(self) -> int:
        return len(self.images)


def decode_fn(vqgan):
    """A compiled (N, grid*grid) codes -> uint8 (N, H, W, 3) through `vqgan`'s decoder."""
    compiled = jax.jit(functools.partial(runs.decode_uint8, vqgan))
    return lambda codes: np.asarray(jax.device_get(compiled(vqgan.params, np.asarray(codes, np.int32))))


def load_split(encoded_dir: str, split: str, decode, tokenizer, text_length: int, *, max_examples: int | None = None,
               batch_size: int = 1000, progress: bool = True, contrast_captions=None) -> CaptionedPictures:
    """The first `max_examples` (default: all) records of `split`, decoded `batch_size` at a time (`decode` None:
    their codes, undecoded); `contrast_captions(record)` (None: no record has any) gives each one's twins."""
    if not storage.exists(storage.join(encoded_dir, token_records.MANIFEST)):
        raise FileNotFoundError(
            f"{encoded_dir} holds no encoded records: the caption model learns from a seq2seq run trained by this "
            "project (its encoded/ directory), not from an imported one. Pass such a run as "
            "--config.seq2seq_workdir.")
    source = token_records.open_split(encoded_dir, split)
    count = len(source) if max_examples is None else min(len(source), max_examples)
    records = [source[i] for i in range(count)]
    most = max(len(r["captions"]) for r in records)
    captions = np.full((count, most, text_length), text_lib.PAD_ID, np.int32)
    counts = np.zeros((count,), np.int32)
    contrasts = [contrast_captions(r) if contrast_captions else [] for r in records]
    width = max([1] + [len(c) for c in contrasts])
    twins = np.full((count, width, text_length), text_lib.PAD_ID, np.int32)
    twin_rows = np.zeros((count, width), bool)
    for i, record in enumerate(records):
        texts = list(record["captions"])
        counts[i] = len(texts)
        captions[i] = tokenizer.encode_batch(texts + texts[:1] * (most - len(texts)), text_length)
        for j, caption in enumerate(contrasts[i]):
            if caption is not None:
                twins[i, j] = tokenizer.encode(caption, text_length)
                twin_rows[i, j] = True
    codes = np.stack([np.asarray(r["codes"], np.int32) for r in records])
    images = codes if decode is None else np.concatenate([decode(codes[s:s + batch_size]) for s in tqdm(
        range(0, count, batch_size), desc=f"decoding {split}", unit="batch", disable=not progress)])
    return CaptionedPictures(images=images, captions=captions, caption_counts=counts, twins=twins,
                             twin_rows=twin_rows)


def train_batch(data: CaptionedPictures, seed: int, step: int, batch_size: int) -> dict:
    """Step `step`'s batch, drawn from (seed, step) alone: `images` and `text_ids`, one of each image's captions
    at random."""
    rng = np.random.default_rng([seed, step])
    rows = rng.integers(0, len(data), batch_size)
    which = (rng.random(batch_size) * data.caption_counts[rows]).astype(np.int64)
    return dict(images=data.images[rows], text_ids=data.captions[rows, which, :data.longest_caption])
