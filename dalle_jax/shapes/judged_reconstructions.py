"""Extension (`config.extensions`) of the VQGAN trainer: its final test figures judge each reconstruction against
the scene of its captioned_shapes example (`judge_*` figures). Hook (`dalle_jax/extensions.py`):
`evaluate_reconstructions`."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from dalle_jax.data import shapes_scene
from dalle_jax.shapes import judge


def evaluate_reconstructions(config: ml_collections.ConfigDict, source, reconstructions: np.ndarray) -> dict:
    """`judge_*` figures of the reconstructions of `source`'s first examples; none for a dataset without scenes."""
    if config.data.dataset != "captioned_shapes" or jax.process_count() > 1:
        return {}  # Reconstructions of other processes' examples are not gathered here.
    results = [judge.judge(image, shapes_scene.scene_from_example(source[i]))
               for i, image in enumerate(reconstructions)]
    return {f"judge_{k}": v for k, v in judge.aggregate(results).items()}
