"""The dataset a seq2seq run reads: unless its config names one, the dataset its VQGAN run was trained on.

`config.data.dataset = ""` takes the VQGAN run's dataset, folder, data_dir and split sizes (each one the seq2seq
config leaves empty), its feature names (where the seq2seq config keeps the defaults) and, where
`config.data.image_size` is 0, its image size, all read from the VQGAN's config.json; the run logs which. A named
dataset (or folder) other than the VQGAN's is used as named, with a warning that names both.
"""
from __future__ import annotations

import copy
import logging
import os

import ml_collections

from dalle_jax import runs, storage

_SOURCE_FIELDS = ("dataset", "folder", "data_dir", "shapes_split_sizes")  # taken where the seq2seq config is empty
_FEATURE_DEFAULTS = dict(image_key="image", text_key="caption")  # taken where the seq2seq config keeps these


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of the seq2seq `config` with its data read from the VQGAN run where `config.data.dataset` is ""."""
    config = copy.deepcopy(config)
    data = config.data
    if data.dataset:
        _warn_on_mismatch(data, config.vqgan_workdir)
        return config
    vqgan = runs.read_config(config.vqgan_workdir, "vqgan")
    if vqgan.get("imported_from"):
        raise ValueError(f"config.data.dataset is empty, which means the VQGAN's dataset, but the VQGAN in "
                         f"{config.vqgan_workdir!r} was imported ({vqgan.imported_from}), not trained here; name "
                         "the images to train on: --config.data.dataset=captioned_folder --config.data.folder=DIR.")
    for field in _SOURCE_FIELDS:
        if not data.get(field):
            data[field] = _value(vqgan.data.get(field))
    for field, default in _FEATURE_DEFAULTS.items():
        if data[field] == default:
            data[field] = vqgan.data.get(field, default)
    if not data.image_size:
        data.image_size = int(vqgan.data.image_size)
    logging.info("Data: %s, the dataset of the VQGAN run in %s (config.data.dataset was empty).", _describe(data),
                 storage.abspath(config.vqgan_workdir))
    return config


def _warn_on_mismatch(data, vqgan_workdir: str) -> None:
    path = storage.join(vqgan_workdir, runs.CONFIG_FILE)
    if not storage.isfile(path):
        return  # loading the VQGAN says what is wrong
    vqgan = runs.load_config(vqgan_workdir)
    if vqgan.get("trainer") != "vqgan" or vqgan.get("imported_from") or "data" not in vqgan:
        return
    if (data.dataset, _folder(data)) != (vqgan.data.dataset, _folder(vqgan.data)):
        logging.warning("This run reads %s, but its VQGAN (%s) was trained on %s; its codes may describe these "
                        "images poorly. Leave config.data.dataset empty to read the VQGAN's dataset.",
                        _describe(data), storage.abspath(vqgan_workdir), _describe(vqgan.data))


def _folder(data) -> str:
    folder = data.get("folder") or ""
    return storage.abspath(os.path.expanduser(folder)) if folder and data.dataset == "captioned_folder" else ""


def _describe(data) -> str:
    folder = _folder(data)
    return f"{data.dataset} (folder {folder})" if folder else str(data.dataset)


def _value(value):
    """A config.json value as the config holds it (JSON turned the split sizes' dict into a ConfigDict)."""
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
