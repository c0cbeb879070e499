"""Checks of a config's data before any work: the dataset it names, the splits a run reads, the evaluation batch.

    split_checks.check_data_config(config.data)          # before anything is prepared
    sizes = split_checks.split_sizes(builder)            # once the dataset is prepared
    config.data.eval_batch_size = split_checks.fitted_eval_batch(config.data, sizes, multiple)
    final = split_checks.final_split(sizes)              # "test", or "validation" where there is no test split
"""
from __future__ import annotations

import logging
import math
import os

from dalle_jax import storage

EVALUATED = "validation"  # the split of the periodic evaluations


def check_data_config(data_cfg) -> None:
    """Fails on what is wrong with `data_cfg` before any data is read: no dataset, or captioned_folder without an
    existing folder."""
    if not data_cfg.dataset:
        raise ValueError("config.data.dataset is empty; name one: --config.data.dataset=captioned_folder (with "
                         "--config.data.folder=DIR), captioned_shapes, or a prepared TFDS dataset.")
    if data_cfg.dataset == "captioned_folder":
        if not data_cfg.folder:
            raise ValueError("config.data.dataset=captioned_folder reads your images: pass "
                             "--config.data.folder=DIR, a folder holding them and a captions.jsonl with one "
                             "{\"file\": ..., \"caption\": ...} object per line.")
        if not storage.is_remote(data_cfg.folder) and not os.path.isdir(os.path.expanduser(data_cfg.folder)):
            raise FileNotFoundError(f"config.data.folder={data_cfg.folder!r} is not a directory; pass "
                                    "--config.data.folder=DIR, the folder holding your images and captions.jsonl.")
    if data_cfg.dataset != "captioned_shapes" and data_cfg.get("shapes_split_sizes"):
        logging.warning("config.data.shapes_split_sizes=%s sizes captioned_shapes only; %s keeps its own splits.",
                        dict(data_cfg.shapes_split_sizes), data_cfg.dataset)


def split_sizes(builder) -> dict[str, int]:
    """{split: examples} of a prepared TFDS dataset."""
    return {name: int(split.num_examples) for name, split in builder.info.splits.items()}


def final_split(sizes: dict[str, int]) -> str:
    """The split of a run's final figures: `test`, or `validation` for a dataset without one (captioned_folder)."""
    return "test" if sizes.get("test") else EVALUATED


def fitted_eval_batch(data_cfg, sizes: dict[str, int], multiple: int = 1) -> int:
    """`data_cfg.eval_batch_size`, checked against the splits a run reads (`train`, `validation` and the final one),
    and lowered to the largest multiple of `multiple` (the devices and processes a batch is split over) that fits
    the smallest evaluated split. Fails, naming the fix, on a missing split or too little data."""
    name = data_cfg.dataset
    for split in ("train", EVALUATED):
        if not sizes.get(split):
            raise ValueError(
                f"Dataset {name!r} has no {split!r} split (it has {sorted(sizes)}), which a run reads. For "
                "captioned_folder, add images: about 2% of the files (chosen by a hash of their path) go to "
                "validation, so a folder needs roughly 50 or more.")
    if sizes["train"] < data_cfg.batch_size:
        raise ValueError(f"The train split of {name!r} has {sizes['train']} examples, fewer than one batch; lower "
                         f"--config.data.batch_size to at most {sizes['train']} or add images.")
    smallest = min(sizes[EVALUATED], sizes[final_split(sizes)])
    wanted = int(data_cfg.eval_batch_size)
    if wanted <= smallest:
        return wanted
    fitted = smallest // multiple * multiple
    if not fitted:
        raise ValueError(f"The evaluated splits of {name!r} hold {smallest} examples, fewer than the {multiple} "
                         "devices and processes an evaluation batch is split over; add images or use fewer devices.")
    # Lowered rather than refused: how many of a folder's images land in `validation` is only known once the folder
    # is prepared, and a smaller evaluation batch changes no figure but the count of examples evaluated.
    logging.warning("config.data.eval_batch_size=%d is larger than the %d examples of the smallest evaluated split "
                    "of %r; evaluating in batches of %d instead (set --config.data.eval_batch_size to choose).",
                    wanted, smallest, name, fitted)
    return fitted


def batch_multiple(parallelism: int, processes: int) -> int:
    """The number every global batch must be a multiple of."""
    return math.lcm(parallelism, processes)
