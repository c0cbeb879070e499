"""The canonical export: a folder with `config.json`, `model.safetensors` and the tokenizer, readable from any
framework with the `safetensors` library and loaded back into dalle_jax exactly.

Tensors keep dalle_jax's layouts (linear kernels (in, out), conv kernels (kh, kw, in, out)) under per-layer dotted
names (`encoder.layers.0.self_attn.q_proj.kernel`, see `names`); `config.json` records the architecture, the token
ids, the image grid and the tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil

import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from dalle_jax.data import text as text_lib
from dalle_jax.interop import names

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
FORMAT = "dalle_jax"
DTYPES = ("float32", "bfloat16", "float16")


def _numpy_dtype(dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {DTYPES}.")
    if dtype == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def describe(kind: str, config: ml_collections.ConfigDict, tokenizer_files: list[str]) -> dict:
    model = config.model.to_dict()
    record = dict(format=FORMAT, kind=kind, model=model)
    if kind == "seq2seq":
        side = int(round(model["image_length"] ** 0.5))
        record.update(
            token_ids=dict(bos=text_lib.BOS_ID, pad=text_lib.PAD_ID, eos=text_lib.EOS_ID, unk=text_lib.UNK_ID,
                           image_start=int(model["image_vocab_size"])),
            image_grid=dict(height=side, width=side, order="row-major"),
            tokenizer=dict(files=[os.path.basename(p) for p in tokenizer_files],
                           kind="sentencepiece" if any(p.endswith(".model") for p in tokenizer_files)
                           else "min-dalle-bpe"))
    else:
        grid = model["resolution"] // 2 ** (len(model["ch_mult"]) - 1)
        record.update(image_grid=dict(height=grid, width=grid, order="row-major"),
                      image_range=[-1.0, 1.0], decode_only=bool(config.get("decode_only", False)))
    return record


def export(out_dir: str, kind: str, config: ml_collections.ConfigDict, params, *, dtype: str = "float32",
           tokenizer_files: list[str] = ()) -> None:
    target = _numpy_dtype(dtype)
    tensors = {k: np.ascontiguousarray(np.asarray(v).astype(target)) for k, v in names.flatten(params).items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": FORMAT, "kind": kind})
    for path in tokenizer_files:
        shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(describe(kind, config, list(tokenizer_files)), f, indent=2, sort_keys=True)


def read_description(src: str) -> dict:
    path = os.path.join(src, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {src!r} is not a dalle_jax safetensors export.")
    with open(path) as f:
        record = json.load(f)
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} has format={record.get('format')!r}, not {FORMAT!r}.")
    return record


def import_params(src: str, template, *, param_dtype: str = "float32") -> dict:
    """The folder's tensors, checked against `template`'s names and shapes and cast to `param_dtype`."""
    path = os.path.join(src, WEIGHTS_FILE)
    flat = load_file(path)
    target = _numpy_dtype(param_dtype)
    params = names.unflatten_like(flat, template, source=path)
    import jax
    return jax.tree.map(lambda x: np.asarray(x).astype(target), params)
