"""The byte-pair text tokenizer of DALL·E mini / mega as min-dalle runs it (`vocab.json` + `merges.txt`), with the
interface of `dalle_jax.data.text.TextTokenizer`, so a work directory imported from min-dalle samples with the ids
its model was trained on.

A prompt is prepared as min-dalle prepares it: emoji spelled out by name (the `emoji` package), lower case, every
non-ASCII character dropped, words split on single spaces. Each word, prefixed with the word-start marker, is
merged pair by pair (the lowest-ranked adjacent pair first, its leftmost occurrence) until no ranked pair is left.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from dalle_jax import storage
from dalle_jax.data import text as text_lib

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
WORD_START = chr(ord(" ") + 256)  # "Ġ": byte-level BPE's printable stand-in for the space before a word
SPECIALS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>"}


def has_files(directory: str) -> bool:
    return all(storage.isfile(storage.join(directory, f)) for f in (VOCAB_FILE, MERGES_FILE))


def _demojize(text: str) -> str:
    if text.isascii():
        return text
    try:
        import emoji
    except ImportError as err:
        raise ImportError(f"The prompt {text!r} has non-ASCII characters; min-dalle's tokenizer spells emoji out by "
                          "name with the `emoji` package: pip install emoji.") from err
    return emoji.demojize(text, delimiters=("", ""))


def prepare(text: str) -> list[str]:
    """The words min-dalle tokenizes for `text`."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}: {text!r}.")
    text = _demojize(text).lower().encode("ascii", errors="ignore").decode()
    return [word for word in text.split(" ") if word]


class MinDalleTokenizer:
    """Encodes captions into fixed-length `<s> ids </s> <pad>...` rows with DALL·E mini's BPE vocabulary."""

    def __init__(self, directory: str):
        if not has_files(directory):
            raise FileNotFoundError(f"{directory!r} lacks {VOCAB_FILE} and/or {MERGES_FILE}, the BPE tokenizer files "
                                    "of a min-dalle model directory.")
        self.directory = directory
        with storage.open(storage.join(directory, VOCAB_FILE), encoding="utf8") as f:
            self._ids = json.load(f)
        with storage.open(storage.join(directory, MERGES_FILE), encoding="utf8") as f:
            lines = f.read().split("\n")
        pairs = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self._rank = {pair: rank for rank, pair in enumerate(pairs)}  # a repeated pair keeps its last rank
        self._pieces = {i: piece for piece, i in self._ids.items()}
        found = tuple(self._ids.get(SPECIALS[k]) for k in ("bos", "pad", "eos", "unk"))
        needed = (text_lib.BOS_ID, text_lib.PAD_ID, text_lib.EOS_ID, text_lib.UNK_ID)
        if found != needed:
            raise ValueError(f"{VOCAB_FILE} in {directory!r} gives <s>, <pad>, </s>, <unk> the ids {found}; dalle_jax "
                             f"needs BART's {needed}.")

    @property
    def vocab_size(self) -> int:
        return max(self._ids.values()) + 1

    bos_id, pad_id, eos_id, unk_id = text_lib.BOS_ID, text_lib.PAD_ID, text_lib.EOS_ID, text_lib.UNK_ID

    def pieces(self, word: str) -> list[str]:
        parts = [WORD_START, *word]
        while len(parts) > 1:
            ranks = [self._rank.get(pair) for pair in zip(parts[:-1], parts[1:])]
            ranked = [r for r in ranks if r is not None]
            if not ranked:
                break
            i = ranks.index(min(ranked))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def ids(self, caption: str) -> list[int]:
        """min-dalle's ids of `caption`: `<s>`, the pieces (`<unk>` for pieces outside the vocabulary), `</s>`."""
        body = [self._ids.get(p, self.unk_id) for word in prepare(caption) for p in self.pieces(word)]
        return [self.bos_id, *body, self.eos_id]

    def encode_with_truncation(self, caption: str, max_length: int) -> tuple[np.ndarray, bool]:
        """(ids of shape (max_length,), whether ids were dropped). As min-dalle does, a long caption keeps its first
        max_length ids (so it loses its `</s>`)."""
        if int(max_length) < text_lib.MIN_MAX_LENGTH:
            raise ValueError(f"max_length={max_length} leaves no room for `<s>`, a token and `</s>`; use at least "
                             f"{text_lib.MIN_MAX_LENGTH}.")
        ids = self.ids(caption)
        row = np.full((int(max_length),), self.pad_id, np.int32)
        kept = ids[: int(max_length)]
        row[: len(kept)] = kept
        return row, len(ids) > int(max_length)

    def encode(self, caption: str, max_length: int) -> np.ndarray:
        return self.encode_with_truncation(caption, max_length)[0]

    def encode_batch(self, captions: Sequence[str], max_length: int) -> np.ndarray:
        rows = [self.encode(c, max_length) for c in captions]
        return np.stack(rows) if rows else np.zeros((0, int(max_length)), np.int32)

    def decode(self, ids) -> str:
        """Text of the ids up to the first `</s>`, ignoring `<s>` and `<pad>`."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode expects one row of ids (1-D), got shape {ids.shape}; use decode_batch.")
        pieces = []
        for i in ids.tolist():
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id):
                continue
            if i not in self._pieces:
                raise ValueError(f"token id {i} is not in {VOCAB_FILE}.")
            pieces.append(self._pieces[i])
        return "".join(pieces).replace(WORD_START, " ").strip()

    def decode_batch(self, ids) -> list[str]:
        return [self.decode(row) for row in np.asarray(ids)]
