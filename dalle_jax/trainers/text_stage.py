"""The seq2seq run's text tokenizer: the one stored in the work directory, a user's model, or one trained here.

The work directory keeps its tokenizer, so sampling and export tokenize exactly as training did: a sentencepiece
`tokenizer.model`, or, in a work directory imported from min-dalle, min-dalle's BPE `vocab.json` + `merges.txt`
(whose ids the imported weights were trained with).
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import jax

from dalle_jax import runs, storage
from dalle_jax.data import min_dalle_tokenizer, text as text_lib


def _same_bytes(a: str, b: str) -> bool:
    return storage.read_bytes(a) == storage.read_bytes(b)


def prepare_tokenizer(config, workdir: str, train_captions: Iterable[str]):
    """The work directory's tokenizer (either kind), creating `workdir/tokenizer.model` first when there is none,
    from `config.text.tokenizer_model` or by training a sentencepiece model of `config.text.vocab_size` pieces on
    `train_captions` (read only when training)."""
    path = storage.join(workdir, runs.TOKENIZER_FILE)
    user_model = config.text.tokenizer_model
    if user_model and not storage.isfile(user_model):
        raise FileNotFoundError(f"config.text.tokenizer_model={user_model!r} does not exist; name a sentencepiece "
                                ".model file, or leave it empty to train one on the captions.")
    if not storage.exists(path) and min_dalle_tokenizer.has_files(workdir):
        if user_model:
            raise ValueError(f"{workdir!r} holds min-dalle's BPE tokenizer ({min_dalle_tokenizer.VOCAB_FILE}, "
                             f"{min_dalle_tokenizer.MERGES_FILE}), whose ids its weights were trained with; "
                             f"config.text.tokenizer_model={user_model!r} would change them. Leave it empty, or "
                             "use a new --workdir.")
    elif storage.exists(path):
        if user_model and not _same_bytes(user_model, path):
            raise ValueError(f"{path} differs from config.text.tokenizer_model={user_model!r}; this run was "
                             "started with the stored tokenizer. Use a new --workdir to change tokenizers.")
    elif jax.process_index() == 0:
        storage.makedirs(workdir)
        if user_model:
            logging.info("Using the tokenizer %s", storage.shown(user_model))
            storage.write_atomic(path, storage.read_bytes(user_model))
        else:
            logging.info("Training a %d-piece text tokenizer on the training captions", config.text.vocab_size)
            # sentencepiece writes a local file; a bucket's run trains it on local scratch and uploads it whole.
            local_dir = storage.staging_dir(workdir) if storage.is_remote(workdir) else workdir
            written = text_lib.train_tokenizer(train_captions, config.text.vocab_size,
                                               os.path.join(local_dir, "tokenizer.partial"))
            storage.replace(written, path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("text tokenizer ready")
    tokenizer = runs.load_tokenizer(workdir)
    if tokenizer.vocab_size > config.model.text_vocab_size:
        raise ValueError(f"The tokenizer in {workdir} has {tokenizer.vocab_size} pieces, more than "
                         f"config.model.text_vocab_size={config.model.text_vocab_size}; raise "
                         "config.model.text_vocab_size (or config.text.vocab_size) to at least that.")
    return tokenizer
