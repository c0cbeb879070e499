"""`dalle_jax.shapes.left_or_above`: two-object scenes captioned left (or upper) object first, early in training."""
import numpy as np
import pytest

from dalle_jax.configs import shapes_dalle
from dalle_jax.data import pipeline
from dalle_jax.shapes import left_or_above
from dalle_jax.trainers import seq2seq_step
from tests.data.test_pipeline import _WordTokenizer


@pytest.mark.parametrize("relation, expected", [
    ("to the left of", "a red circle to the left of a blue square"),
    ("above", "a red circle above a blue square"),
    ("to the right of", "a blue square to the left of a red circle"),
    ("below", "a blue square above a red circle"),
])
def test_left_or_above_captions_name_the_left_or_upper_object_first(relation, expected):
    scene = {"objects": [{"color": "red", "shape": "circle", "size": "small", "cell": "left", "box": (0, 0, 8, 8)},
                         {"color": "blue", "shape": "square", "size": "large", "cell": "right", "box": (9, 9, 23, 23)}],
             "relation": relation}
    assert left_or_above.left_or_above_caption(scene) == expected
    with pytest.raises(ValueError, match="two-object scene"):
        left_or_above.left_or_above_caption({"objects": scene["objects"][:1], "relation": "none"})
    with pytest.raises(ValueError, match="relation='near'"):
        left_or_above.left_or_above_caption(dict(scene, relation="near"))


def test_two_object_scenes_take_their_left_or_above_caption_early_in_training():
    config = shapes_dalle.get_config("tiny")
    config.data.left_or_above_caption_steps, config.data.batch_size = 8, 8
    transform = pipeline.caption_and_codes(_WordTokenizer(), 8, random_caption=True, canonical_prob=1.0,
                                           train_caption=left_or_above.train_caption(config))
    objects = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]
    two = {"captions": ["a red circle below a blue square", "p1"], "codes": [1],
           "scene": {"objects": objects, "relation": "below"}}
    one = {"captions": ["a small red circle in the top left"], "codes": [1],
           "scene": {"objects": objects[:1], "relation": "none"}}
    rng = np.random.default_rng(0)
    at = lambda example, position: transform({**example, pipeline.STREAM_INDEX: position}, rng)["text_ids"]
    assert at(two, 0) == at(two, 63) == "a blue square above a red circle"
    assert at(two, 64) == "a red circle below a blue square"  # afterwards: the usual draw (canonical, here)
    assert at(one, 0) == "a small red circle in the top left"
    assert at({"captions": ["a photo"], "codes": [1], "scene": None}, 0) == "a photo"  # datasets without scenes
    config.data.left_or_above_caption_steps = 0
    assert left_or_above.train_caption(config) is None


def test_left_or_above_captions_need_captioned_shapes_and_a_step_count():
    config = shapes_dalle.get_config("tiny")
    config.data.left_or_above_caption_steps = -1
    with pytest.raises(ValueError, match="left_or_above_caption_steps=-1 must be >= 0"):
        seq2seq_step.check_config(config)
    config.data.left_or_above_caption_steps, config.data.dataset = 5, "captioned_folder"
    with pytest.raises(ValueError, match="config.data.left_or_above_caption_steps=5 rewords captioned_shapes "
                                         "scenes.*set it to 0"):
        seq2seq_step.check_config(config)
