"""Finds, prepares and opens the TFDS dataset a config names, as random-access sources for grain.

`data.dataset` is `captioned_shapes` (built in), `captioned_folder` (a user's folder of images + captions.jsonl) or
the name of any TFDS dataset prepared in ArrayRecord format with an image and a text feature.

A `data_dir` in a bucket (gs://, s3://) holds the prepared dataset there: TFDS and ArrayRecord read local files, so
process 0 prepares a missing dataset on its local scratch and uploads it, and every process stages the dataset's
files from the bucket onto its own scratch (logged) before reading; no disk is shared between hosts.
"""
from __future__ import annotations

import logging
import os

import jax
import tensorflow_datasets as tfds

from dalle_jax import storage
from dalle_jax.data import captioned_folder, captioned_shapes

SHAPES_SIZES = (32, 64, 128, 256)
INFO_FILE = "dataset_info.json"  # TFDS's record of a prepared dataset


def _data_dir(data_cfg) -> str | None:
    """The local data_dir TFDS reads: the configured one, or this host's scratch copy of a bucket's."""
    if not data_cfg.data_dir:
        return None
    if storage.is_remote(data_cfg.data_dir):
        return storage.staging_dir(data_cfg.data_dir)
    return os.path.expanduser(data_cfg.data_dir)


def _shapes_builder(data_cfg) -> tfds.core.DatasetBuilder:
    size = int(data_cfg.image_size)
    sizes = data_cfg.get("shapes_split_sizes")
    if sizes is None and size in SHAPES_SIZES:
        return captioned_shapes.CaptionedShapes(config=f"s{size}", data_dir=_data_dir(data_cfg))
    sizes = dict(sizes or {})
    name = f"s{size}_" + "_".join(f"{k}{v}" for k, v in sorted(sizes.items()))
    config = captioned_shapes.CaptionedShapesConfig(name=name, image_size=size, split_sizes=sizes or None)
    return captioned_shapes.CaptionedShapes(config=config, data_dir=_data_dir(data_cfg))


def _folder_builder(data_cfg) -> tfds.core.DatasetBuilder:
    if not data_cfg.folder:
        raise ValueError("config.data.dataset=captioned_folder needs config.data.folder=DIR, a folder holding your "
                         "images and a captions.jsonl with one {\"file\": ..., \"caption\": ...} object per line.")
    config = captioned_folder.CaptionedFolderConfig(folder=data_cfg.folder, image_size=int(data_cfg.image_size))
    return captioned_folder.CaptionedFolder(config=config, data_dir=_data_dir(data_cfg))


def builder_for(data_cfg) -> tfds.core.DatasetBuilder:
    if data_cfg.dataset == "captioned_shapes":
        return _shapes_builder(data_cfg)
    if data_cfg.dataset == "captioned_folder":
        return _folder_builder(data_cfg)
    try:
        return tfds.builder(data_cfg.dataset, data_dir=_data_dir(data_cfg))
    except Exception as e:  # TFDS raises several types for an unknown name.
        raise ValueError(f"config.data.dataset={data_cfg.dataset!r} is not a TFDS dataset known here ({e}). Use "
                         "captioned_shapes, captioned_folder (with config.data.folder) or a prepared TFDS name.") from e


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
    """Prepares the dataset on first use (process 0 writes; the others wait and read)."""
    if data_cfg.data_dir and storage.is_remote(data_cfg.data_dir):
        return _prepare_in_bucket(data_cfg)
    builder = builder_for(data_cfg)
    if data_cfg.dataset not in ("captioned_shapes", "captioned_folder"):
        if not builder.is_prepared():
            raise ValueError(f"TFDS dataset {data_cfg.dataset!r} is not prepared in {builder.data_dir_root}. Prepare "
                             "it with `tfds build --file_format=array_record` and point config.data.data_dir there.")
        return builder
    if jax.process_index() == 0 and not builder.is_prepared():
        logging.info("Preparing %s into %s", builder.info.full_name, builder.data_dir)
        builder.download_and_prepare(file_format="array_record")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"prepared {builder.info.full_name}")
        if jax.process_index() != 0:
            builder = builder_for(data_cfg)  # TFDS reads the dataset's info when a builder is made.
    return builder


def _prepare_in_bucket(data_cfg) -> tfds.core.DatasetBuilder:
    builder = builder_for(data_cfg)
    relative = os.path.relpath(builder.data_dir, _data_dir(data_cfg))
    remote = storage.join(data_cfg.data_dir, *relative.split(os.sep))
    complete = storage.join(remote, INFO_FILE)  # uploaded last: the upload is complete once it exists
    if jax.process_index() == 0 and not storage.exists(complete):
        if data_cfg.dataset not in ("captioned_shapes", "captioned_folder"):
            raise ValueError(f"TFDS dataset {data_cfg.dataset!r} is not prepared in {storage.shown(remote)}. Prepare "
                             "it with `tfds build --file_format=array_record` and copy its directory there.")
        if not builder.is_prepared():
            logging.info("Preparing %s on local scratch in %s", builder.info.full_name, builder.data_dir)
            builder.download_and_prepare(file_format="array_record")
        sent = storage.upload_tree_last(builder.data_dir, remote, INFO_FILE)
        logging.info("Uploaded %s to %s (%d bytes)", builder.info.full_name, storage.shown(remote), sent)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"uploaded {builder.info.full_name}")
    storage.stage_tree(remote, builder.data_dir, f"dataset {builder.info.full_name}")
    return builder_for(data_cfg)  # TFDS reads the dataset's info when a builder is made


def open_split(builder: tfds.core.DatasetBuilder, split: str, data_cfg):
    """A random-access source of decoded examples; fails clearly on a missing split or feature."""
    if split not in builder.info.splits:
        raise ValueError(f"Dataset {builder.info.full_name} has no split {split!r}; it has "
                         f"{sorted(builder.info.splits)}.")
    features = builder.info.features
    for field in ("image_key", "text_key"):
        key = data_cfg[field]
        if key not in features:
            raise ValueError(f"config.data.{field}={key!r} is not a feature of {builder.info.full_name}; its "
                             f"features are {sorted(features)}.")
    try:
        return builder.as_data_source(split)
    except NotImplementedError as e:
        raise ValueError(f"{builder.info.full_name} is not stored as ArrayRecord, which random access needs. "
                         "Re-prepare it with `tfds build --file_format=array_record`.") from e
