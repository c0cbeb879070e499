"""Extension (`config.extensions`) of the seq2seq trainer: DalleBart with fixed per-code appearance features.

Hooks (`dalle_jax/extensions.py`): `check_config`, `model_class` (`shapes/code_features_bart.py`) and `init_params`,
which measures the features (`shapes/code_features.py`) for a run with `config.model.code_features` starting from
scratch. The features come from the first MEASURED_IMAGES training images and their codes, as the encode stage wrote
them (record i of the `train` records is example i of the dataset's `train` split); they then live in the checkpoints
with the other parameters.
"""
from __future__ import annotations

import logging

import ml_collections
import numpy as np

from dalle_jax.data import shapes_scene, sources
from dalle_jax.shapes import code_features
from dalle_jax.shapes.code_features_bart import CodeFeaturesBart

MEASURED_IMAGES = 5000


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any work when code features are asked for where they cannot be measured."""
    if "code_features" not in config.model:
        raise ValueError("config.extensions lists dalle_jax.shapes.code_features_stage, but config.model has no "
                         "code_features field; set config.model.code_features (0: off, 25: on).")
    width = int(config.model.code_features)
    if not width:
        return
    if config.data.dataset != "captioned_shapes":
        raise ValueError(f"config.model.code_features={width} describes codes by the captioned_shapes palette, but "
                         f"config.data.dataset={config.data.dataset!r}; set config.model.code_features=0.")
    expected = code_features.palette_width(len(shapes_scene.COLORS))
    if width != expected:
        raise ValueError(f"config.model.code_features={width}, but the captioned_shapes palette gives features of "
                         f"width {expected}; set config.model.code_features={expected} (or 0 to turn them off).")


def measure(config: ml_collections.ConfigDict, train_records) -> np.ndarray:
    """(image_vocab_size + 1, width) float32 features from the first training images and their records' codes."""
    source = sources.open_split(sources.builder_for(config.data), "train", config.data)
    count = min(MEASURED_IMAGES, len(source), len(train_records))
    images = np.stack([np.asarray(source[i][config.data.image_key]) for i in range(count)])
    grid = int(round(config.model.image_length ** 0.5))
    codes = np.stack([np.asarray(train_records[i]["codes"]).reshape(grid, grid) for i in range(count)])
    features = code_features.palette_code_features(images, codes, config.model.image_vocab_size,
                                                   np.array(list(shapes_scene.COLORS.values())),
                                                   shapes_scene.BACKGROUND)
    unseen = config.model.image_vocab_size - len(np.unique(codes))
    logging.info("Code features measured on %d training images; %d of %d codes never occur in them.", count, unseen,
                 config.model.image_vocab_size)
    return features


def model_class(model_config: ml_collections.ConfigDict) -> type:
    return CodeFeaturesBart


def init_params(config: ml_collections.ConfigDict, params: dict, train_records) -> dict:
    """Fresh parameters with their feature table measured from the training images (none without features)."""
    if not int(config.model.code_features):
        return params
    return dict(params, decoder=dict(params["decoder"], code_features=measure(config, train_records)))
