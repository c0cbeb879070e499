"""Extension (`config.extensions`) of the captioner trainer: the captioned_shapes palette features of the codes
(`shapes/code_features.py`) that a caption model with `config.model.reads="code_features"` reads. Hooks
(`dalle_jax/extensions.py`): `code_feature_width` and `code_feature_table`."""
from __future__ import annotations

import ml_collections
import numpy as np

from dalle_jax.data import shapes_scene
from dalle_jax.shapes import code_features, code_features_stage


def code_feature_width(seq2seq_config: ml_collections.ConfigDict) -> int:
    if seq2seq_config.data.dataset != "captioned_shapes":
        raise ValueError(f"config.model.reads='code_features' describes codes by the captioned_shapes palette, but "
                         f"the seq2seq run learned from {seq2seq_config.data.dataset!r}; set "
                         "--config.model.reads=pixels.")
    return code_features.palette_width(len(shapes_scene.COLORS))


def code_feature_table(seq2seq_config: ml_collections.ConfigDict, train_records) -> np.ndarray:
    """(image_vocab_size + 1, width) features measured on the seq2seq run's first training images."""
    return code_features_stage.measure(seq2seq_config, train_records)
