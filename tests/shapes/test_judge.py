"""Tests for the captioned_shapes image judge."""
import copy

import numpy as np
import pytest
from scipy import ndimage

from dalle_jax.data import shapes_scene as ss
from dalle_jax.shapes import judge

NUM_SCENES = 200


def _scenes(image_size, count, seed):
    rng = np.random.default_rng(seed)
    modes = ("exclude", "require")
    return [ss.sample_scene(rng, image_size, modes[i % 2]) for i in range(count)]


def _degrade(image, rng, noise=8.0, blur=0.7):
    """A light gaussian blur, then gaussian noise, as a decoder's soft, slightly wrong colours."""
    x = ndimage.gaussian_filter(image.astype(np.float32), sigma=(blur, blur, 0))
    x = x + rng.normal(0.0, noise, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _one_object(color="red", shape="circle", size="large", cell="center", image_size=32):
    side = ss.box_side(size, image_size)
    row, col = ss.cell_row_col(cell)
    x0 = min(max(round((2 * col + 1) * image_size / 6 - side / 2), 0), image_size - side)
    y0 = min(max(round((2 * row + 1) * image_size / 6 - side / 2), 0), image_size - side)
    obj = {"color": color, "shape": shape, "size": size, "cell": cell, "box": (x0, y0, x0 + side, y0 + side)}
    return {"objects": [obj], "relation": "none"}


@pytest.mark.parametrize("image_size", [32, 64])
def test_accepts_the_datasets_own_images(image_size):
    scenes = _scenes(image_size, NUM_SCENES, seed=image_size)
    result = judge.aggregate(judge.judge(ss.render(s, image_size), s) for s in scenes)
    assert result["correct"] >= 0.99, result
    assert result["count"] == NUM_SCENES
    assert set(result) == {"correct", "count", "color", "shape", "size", "cell", "relation"}


@pytest.mark.parametrize("image_size", [32, 64])
def test_accepts_noisy_blurred_images(image_size):
    rng = np.random.default_rng(1)
    scenes = _scenes(image_size, NUM_SCENES, seed=image_size + 1)
    result = judge.aggregate(judge.judge(_degrade(ss.render(s, image_size), rng), s) for s in scenes)
    assert result["correct"] >= 0.99, result


def _mutated(scene, attribute, rng):
    scene = copy.deepcopy(scene)
    if attribute == "relation":
        scene["relation"] = ss.INVERSE_RELATION[scene["relation"]]
        return scene
    values = {"color": tuple(ss.COLORS), "shape": ss.SHAPES, "size": ss.SIZES, "cell": ss.CELLS}[attribute]
    obj = scene["objects"][int(rng.integers(len(scene["objects"])))]
    obj[attribute] = str(rng.choice([v for v in values if v != obj[attribute]]))
    return scene


@pytest.mark.parametrize("attribute", ["color", "shape", "size", "cell", "relation"])
def test_rejects_a_wrong_caption(attribute):
    rng = np.random.default_rng(2)
    rejected = []
    for scene in _scenes(32, 300, seed=3):
        objects = scene["objects"]
        if attribute in ("size", "cell") and len(objects) != 1:
            continue  # the canonical two-object caption states neither
        if attribute == "relation" and (
            len(objects) != 2 or (objects[0]["color"], objects[0]["shape"]) == (objects[1]["color"], objects[1]["shape"])
        ):
            continue  # two identical objects make the inverse relation true as well
        image = ss.render(scene, 32)
        verdict = judge.judge(image, _mutated(scene, attribute, rng))
        rejected.append(not verdict.correct and not verdict.attributes[attribute])
    assert len(rejected) >= 50
    assert np.mean(rejected) >= 0.99


def test_rejects_an_empty_canvas_and_a_canvas_of_one_colour():
    scene = _one_object()
    empty = np.full((32, 32, 3), ss.BACKGROUND, np.uint8)
    verdict = judge.judge(empty, scene)
    assert not verdict.correct and not verdict.attributes["color"] and verdict.components == (None,)
    flooded = np.full((32, 32, 3), ss.COLORS["red"], np.uint8)
    assert not judge.judge(flooded, scene).correct


def test_reads_each_attribute_of_a_known_object():
    scene = _one_object("blue", "triangle", "small", "bottom right", image_size=64)
    verdict = judge.judge(ss.render(scene, 64), scene)
    assert verdict.correct
    (component,) = verdict.components
    assert (component.color, component.shape, component.size, component.cell) == (
        "blue", "triangle", "small", "bottom right")
    assert component.box == scene["objects"][0]["box"]


def test_tolerates_speckles_and_a_stray_blob():
    rng = np.random.default_rng(4)
    scene = _one_object("green", "square", "large", "left", image_size=64)
    image = ss.render(scene, 64)
    ys, xs = rng.integers(0, 64, size=(2, 40))
    image[ys, xs] = ss.COLORS["green"]  # single-pixel speckles of the object's own colour
    image[2:6, 50:54] = ss.COLORS["green"]  # a blob too small to be an object
    assert judge.judge(image, scene).correct


def test_matches_two_objects_of_one_colour():
    image_size = 64
    left = _one_object("red", "circle", "small", "left", image_size)["objects"][0]
    right = _one_object("red", "square", "small", "right", image_size)["objects"][0]
    scene = {"objects": [left, right], "relation": "to the left of"}
    image = ss.render(scene, image_size)
    assert judge.judge(image, scene).correct
    swapped = {"objects": [left, right], "relation": "to the right of"}
    assert not judge.judge(image, swapped).correct
    # The second red object is a square, so "a red circle to the left of a red circle" is wrong.
    assert not judge.judge(image, {"objects": [left, dict(right, shape="circle")], "relation": "to the left of"}).correct


def test_judges_only_the_stated_attributes():
    scene = _one_object("yellow", "circle", "small", "top left")
    image = ss.render(scene, 32)
    wrong_place = copy.deepcopy(scene)
    wrong_place["objects"][0].update(cell="bottom right", size="large")
    assert not judge.judge(image, wrong_place).correct
    verdict = judge.judge(image, wrong_place, attributes=ss.stated_attributes("a yellow circle"))
    assert verdict.correct and set(verdict.attributes) == {"color", "shape"}
    with pytest.raises(ValueError, match="texture"):
        judge.judge(image, scene, attributes={"texture"})


def test_palette_labels_count_background_blends_past_half_way():
    pixels = [ss.BACKGROUND, ss.COLORS["purple"]]
    red, background = np.array(ss.COLORS["red"], float), np.array(ss.BACKGROUND, float)
    pixels += [np.round(0.6 * red + 0.4 * background), np.round(0.4 * red + 0.6 * background)]
    image = np.zeros((16, 16, 3), np.uint8)
    image[0, :4] = np.array(pixels, np.uint8)
    labels = judge.palette_labels(image)[0, :4]
    names = [judge.PALETTE_NAMES[i] for i in labels]
    assert names == ["background", "purple", "red", "background"]


def test_scene_from_a_decoded_tfds_example_judges_like_the_scene():
    scene = {
        "objects": [
            {"color": "orange", "shape": "triangle", "size": "large", "cell": "top left", "box": (0, 0, 14, 14)},
            {"color": "blue", "shape": "circle", "size": "small", "cell": "bottom right", "box": (22, 22, 30, 30)},
        ],
        "relation": "above",
    }
    example = {
        "objects": {
            "color": [np.int64(5), np.int64(2)],
            "shape": [np.int64(2), np.int64(0)],
            "size": [np.int64(1), np.int64(0)],
            "cell": [np.int64(0), np.int64(8)],
            "box": [np.array([0, 0, 14, 14], np.int32), np.array([22, 22, 30, 30], np.int32)],
        },
        "relation": np.int64(3),
    }
    assert ss.scene_from_example(example) == scene
    named = {"objects": [dict(o, color=o["color"].encode()) for o in scene["objects"]], "relation": b"above"}
    assert ss.scene_from_example(named) == scene
    image = ss.render(scene, 32)
    assert judge.judge(image, example) == judge.judge(image, scene)


def test_bad_scenes_and_images_fail_loudly():
    scene = _one_object()
    image = ss.render(scene, 32)
    with pytest.raises(ValueError, match="uint8"):
        judge.judge(image.astype(np.float32), scene)
    with pytest.raises(ValueError, match="square"):
        judge.judge(image[:, :20], scene)
    with pytest.raises(ValueError, match="pink"):
        ss.scene_from_example({"objects": [dict(scene["objects"][0], color="pink")], "relation": "none"})
    with pytest.raises(ValueError, match="cell=12"):
        ss.scene_from_example({"objects": [dict(scene["objects"][0], cell=12)], "relation": 0})
    with pytest.raises(ValueError, match="relation"):
        ss.scene_from_example({"objects": scene["objects"], "relation": "above"})


def test_aggregate_counts_each_attribute_over_the_judgements_that_judged_it():
    verdicts = [
        judge.Judgement(True, {"color": True, "shape": True, "relation": True}, (None, None)),
        judge.Judgement(False, {"color": True, "shape": False, "size": True, "cell": True}, (None,)),
        judge.Judgement(False, {"color": False, "shape": False, "relation": False}, (None, None)),
        judge.Judgement(True, {"color": True, "shape": True, "size": True, "cell": True}, (None,)),
    ]
    result = judge.aggregate(verdicts)
    assert result == {
        "correct": 0.5, "count": 4.0, "color": 0.75, "shape": 0.5, "size": 1.0, "cell": 1.0, "relation": 0.5}
    with pytest.raises(ValueError, match="at least one"):
        judge.aggregate([])
