"""Extension (`config.extensions`) of the seq2seq trainer: left-or-above captions early in training.

For the first `config.data.left_or_above_caption_steps` steps, two-object captioned_shapes scenes are captioned with
the left (or upper) object named first ("to the left of", "above"): which object goes where then follows from word
order alone, and the inverse wordings are learned on top of it afterwards. Hooks (`dalle_jax/extensions.py`):
`check_config` and `train_caption`.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from dalle_jax.data import pipeline, shapes_scene


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any work on a step count this extension cannot use."""
    if "left_or_above_caption_steps" not in config.data:
        raise ValueError("config.extensions lists dalle_jax.shapes.left_or_above, but config.data has no "
                         "left_or_above_caption_steps field; set it (0: off).")
    steps = int(config.data.left_or_above_caption_steps)
    if steps < 0:
        raise ValueError(f"config.data.left_or_above_caption_steps={steps} must be >= 0.")
    if steps and config.data.dataset != "captioned_shapes":
        raise ValueError(f"config.data.left_or_above_caption_steps={steps} rewords captioned_shapes scenes, but "
                         f"config.data.dataset={config.data.dataset!r}; set it to 0.")


def train_caption(config: ml_collections.ConfigDict) -> Callable[[pipeline.Example], str | None] | None:
    """The left-or-above caption of a two-object scene at a stream position within the first steps, else None."""
    examples = int(config.data.left_or_above_caption_steps) * int(config.data.batch_size)
    if not examples:
        return None

    def caption(example: pipeline.Example) -> str | None:
        scene = example.get("scene")
        if example[pipeline.STREAM_INDEX] < examples and scene and len(scene["objects"]) == 2:
            return left_or_above_caption(scene)
        return None

    return caption


def left_or_above_caption(scene: dict) -> str:
    """A two-object scene's caption worded so that the object on the left (or above) is named first:
    `a {color} {shape} to the left of|above a {color} {shape}`."""
    objects = scene["objects"]
    if len(objects) != 2:
        raise ValueError(f"a left-or-above caption needs a two-object scene, got {len(objects)} object(s).")
    relation = scene["relation"]
    if relation not in shapes_scene.INVERSE_RELATION:
        raise ValueError(f"relation={relation!r} of a two-object scene must be one of {shapes_scene.RELATIONS[1:]}.")
    if relation in ("to the right of", "below"):
        scene = {"objects": objects[::-1], "relation": shapes_scene.INVERSE_RELATION[relation]}
    return shapes_scene.canonical_caption(scene)
