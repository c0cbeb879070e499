"""Caption normalisation and the sentencepiece text tokenizer with BART's special ids.

Training and sampling both go through `normalize_caption`, so a prompt is tokenized exactly like the
captions the model was trained on. Ids follow BART: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3.
"""
from __future__ import annotations

import io
import os
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>"}
MIN_MAX_LENGTH = 3  # `<s>`, one token, `</s>`


def empty_caption_ids(length: int) -> np.ndarray:
    """The empty caption `<s></s>`, `<pad>`-padded to `length`: what guidance and blanked training captions use."""
    ids = np.full((length,), PAD_ID, np.int32)
    ids[:2] = (BOS_ID, EOS_ID)
    return ids

_WHITESPACE = re.compile(r"\s+")


def normalize_caption(caption: str) -> str:
    """NFKC, lower case, every run of whitespace collapsed to one space, stripped."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}: {caption!r}.")
    text = unicodedata.normalize("NFKC", caption).lower()
    return _WHITESPACE.sub(" ", text).strip()


def train_tokenizer(captions: Iterable[str], vocab_size: int, model_prefix_path: str, *,
                    model_type: str = "unigram") -> str:
    """Trains a sentencepiece model on the normalised captions and writes `{model_prefix_path}.model`.

    `vocab_size` is an upper bound: a corpus too small for it yields a smaller vocabulary (read the
    actual size from `TextTokenizer(path).vocab_size`). The same captions always give the same bytes.
    """
    if int(vocab_size) < len(SPECIAL_PIECES) + 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room beyond the 4 special tokens; use at least 5.")
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type={model_type!r} is not supported; use 'unigram' or 'bpe'.")
    # Empty captions carry nothing to learn (and the empty caption is encoded as `<s></s>` anyway).
    normalized = [c for c in (normalize_caption(c) for c in captions) if c]
    if not normalized:
        raise ValueError("train_tokenizer got no non-empty captions; pass the training captions.")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(normalized),
            model_writer=model,  # no file path inside the model, so the bytes depend on the captions only
            vocab_size=int(vocab_size),
            model_type=model_type,
            hard_vocab_limit=False,
            character_coverage=1.0,
            normalization_rule_name="identity",  # `normalize_caption` already did NFKC
            num_threads=1,  # one thread keeps training deterministic
            bos_id=BOS_ID, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            bos_piece=SPECIAL_PIECES["bos"], pad_piece=SPECIAL_PIECES["pad"],
            eos_piece=SPECIAL_PIECES["eos"], unk_piece=SPECIAL_PIECES["unk"],
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"sentencepiece could not train a vocabulary of vocab_size={vocab_size} on {len(normalized)} "
            f"captions: {err}. A vocabulary must hold every character of the corpus plus the 4 special "
            f"tokens; increase vocab_size.") from err
    path = f"{model_prefix_path}.model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


class TextTokenizer:
    """Encodes captions into fixed-length `<s> ids </s> <pad>...` rows and back."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"No sentencepiece model at {model_path!r}; train one with train_tokenizer() first.")
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.model_path = model_path
        found = (self._sp.bos_id(), self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
        if found != (BOS_ID, PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"{model_path!r} has special ids <s>,<pad>,</s>,<unk> = {found}, but this project needs "
                f"{(BOS_ID, PAD_ID, EOS_ID, UNK_ID)}; retrain it with train_tokenizer().")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def encode_with_truncation(self, caption: str, max_length: int) -> tuple[np.ndarray, bool]:
        """Returns (ids of shape (max_length,), whether caption tokens were dropped to fit)."""
        if int(max_length) < MIN_MAX_LENGTH:
            raise ValueError(
                f"max_length={max_length} leaves no room for `<s>`, a token and `</s>`; use at least "
                f"{MIN_MAX_LENGTH}.")
        pieces = self._sp.encode(normalize_caption(caption))
        room = int(max_length) - 2
        truncated = len(pieces) > room
        ids = np.full((int(max_length),), PAD_ID, dtype=np.int32)
        body = [BOS_ID, *pieces[:room], EOS_ID]
        ids[:len(body)] = body
        return ids, truncated

    def encode(self, caption: str, max_length: int) -> np.ndarray:
        return self.encode_with_truncation(caption, max_length)[0]

    def encode_batch(self, captions: Sequence[str], max_length: int) -> np.ndarray:
        """(len(captions), max_length) int32; an empty list gives shape (0, max_length)."""
        rows = [self.encode(c, max_length) for c in captions]
        if not rows:
            return np.zeros((0, int(max_length)), dtype=np.int32)
        return np.stack(rows)

    def decode(self, ids) -> str:
        """Text of the ids up to the first `</s>`, ignoring `<s>` and `<pad>`."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode expects one row of ids (1-D), got shape {ids.shape}; use decode_batch.")
        kept = []
        for i in ids.tolist():
            if i == EOS_ID:
                break
            if i in (BOS_ID, PAD_ID):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}).")
            kept.append(i)
        return self._sp.decode(kept)

    def decode_batch(self, ids) -> list[str]:
        return [self.decode(row) for row in np.asarray(ids)]
