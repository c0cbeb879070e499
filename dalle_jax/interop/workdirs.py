"""Reading the parameters of a dalle_jax work directory, and writing work directories for imported weights.

An imported work directory is what training leaves behind, minus the training: `config.json` (a full recipe with
the imported sizes, `imported_from` naming the source) and an orbax checkpoint at step 0 holding the parameters,
which `sample.py --workdir` and the loaders read. A seq2seq directory also holds its text tokenizer's files and
names its VQGAN's work directory.
"""
from __future__ import annotations


import jax
import ml_collections
import numpy as np

from dalle_jax.configs import seq2seq_common, vqgan_common
from dalle_jax.training import checkpointing
from dalle_jax import runs, storage

IMPORTED_STEP = 0


def read_workdir(workdir: str, *, step: int | None = None) -> tuple[str, ml_collections.ConfigDict, dict]:
    """(trainer kind "seq2seq" | "vqgan", the run's config, its parameters as a pure dict of numpy arrays)."""
    kind = runs.load_config(workdir).get("trainer")
    if kind == "seq2seq":
        loaded = runs.load_seq2seq(workdir, step=step)
    elif kind == "vqgan":
        loaded = runs.load_vqgan(workdir, step=step)
    else:
        raise ValueError(f"{workdir!r} has config.trainer={kind!r}; export reads 'seq2seq' or 'vqgan' work "
                         "directories.")
    return kind, loaded.config, jax.tree.map(lambda x: np.asarray(jax.device_get(x)), loaded.params)


def _fresh(workdir: str) -> None:
    if storage.exists(storage.join(workdir, "config.json")) or checkpointing.checkpoint_steps(workdir):
        raise FileExistsError(f"{workdir!r} already holds a run; import into a new --workdir.")


def _cast(params, dtype: str):
    return jax.tree.map(lambda x: np.asarray(x, dtype=np.dtype(jax.numpy.dtype(dtype))), params)


def write_seq2seq(workdir: str, model_fields: dict, params, *, vqgan_workdir: str, tokenizer_files: list[str],
                  imported_from: str) -> ml_collections.ConfigDict:
    """A seq2seq work directory for DalleBart `params` with the sizes `model_fields`."""
    _fresh(workdir)
    config = seq2seq_common.base_config()
    config.text.vocab_size = int(model_fields["text_vocab_size"])
    config.model.update({k: v for k, v in model_fields.items() if k != "text_vocab_size"})
    config.vqgan_workdir = storage.abspath(vqgan_workdir)
    config.imported_from = imported_from
    storage.makedirs(workdir)
    for path in tokenizer_files:
        storage.copyfile(path, storage.join(workdir, storage.basename(path)))
    runs.save_config(config, workdir)
    checkpointing.save_params(workdir, IMPORTED_STEP, _cast(params, config.model.param_dtype))
    return config


def write_vqgan(workdir: str, model_cfg: ml_collections.ConfigDict, params, *, imported_from: str,
                decode_only: bool = False) -> ml_collections.ConfigDict:
    """A VQGAN work directory; `decode_only` marks one whose encoder was not in the source (its encoder
    parameters are NaN, and the encode stage refuses it)."""
    _fresh(workdir)
    config = vqgan_common.base_config(image_size=int(model_cfg.resolution))
    config.model.update(model_cfg.to_dict())
    config.imported_from = imported_from
    config.decode_only = bool(decode_only)
    runs.save_config(config, workdir)
    checkpointing.save_params(workdir, IMPORTED_STEP, _cast(params, "float32"))
    return config
