"""The judge's strict shape reading and its extra-object check (`exact`), with the negative cases of issue 31."""
import numpy as np
import pytest

from dalle_jax.data import shapes_scene as ss
from dalle_jax.shapes import judge, shape_reading
from tests.shapes.test_judge import _degrade, _one_object, _scenes

# Scenes per canvas size for the checks on the dataset's own images (judging takes ~2-10 ms an image).
OWN_IMAGES = {32: 2000, 64: 1000, 128: 150}


@pytest.mark.parametrize("image_size", [16, 32, 64, 128, 256])
def test_strict_reading_names_every_shape_the_dataset_draws(image_size):
    for size in ss.SIZES:
        for shape in ss.SHAPES:
            scene = _one_object("orange", shape, size, "center", image_size)
            (region,) = judge.find_regions(ss.render(scene, image_size))
            assert (region.shape, region.strict_shape) == (shape, shape), (image_size, size, shape)


@pytest.mark.parametrize("image_size", sorted(OWN_IMAGES))
def test_both_readings_judge_the_datasets_own_images_right_and_exact(image_size):
    scenes = _scenes(image_size, OWN_IMAGES[image_size], seed=100 + image_size)
    for scene in scenes:
        image = ss.render(scene, image_size)
        for strict in (False, True):
            verdict = judge.judge(image, scene, strict=strict)
            assert verdict.exact and not verdict.extras, (strict, scene, verdict)


@pytest.mark.parametrize("image_size", [32, 64])
def test_strict_reading_tolerates_blur_and_noise(image_size):
    rng = np.random.default_rng(5)
    scenes = _scenes(image_size, 300, seed=image_size + 7)
    verdicts = [judge.judge(_degrade(ss.render(s, image_size), rng), s, strict=True) for s in scenes]
    assert np.mean([v.exact for v in verdicts]) >= 0.99


def _canvas(image_size=32):
    return np.full((image_size, image_size, 3), ss.BACKGROUND, np.uint8)


def _paint(image, mask, x0, y0, color):
    image[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = ss.COLORS[color]
    return image


def _rounded_square(side, radius):
    centers = np.arange(side) + 0.5
    y, x = centers[:, None], centers[None, :]
    dx = np.maximum(np.maximum(radius - x, x - (side - radius)), 0)
    dy = np.maximum(np.maximum(radius - y, y - (side - radius)), 0)
    return dx**2 + dy**2 <= radius**2


def _ellipse(height, width):
    y, x = (np.arange(height) + 0.5)[:, None], (np.arange(width) + 0.5)[None, :]
    return ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2 <= 1


def _scene(color, shape, size, cell, box):
    return {"objects": [dict(color=color, shape=shape, size=size, cell=cell, box=box)], "relation": "none"}


@pytest.mark.parametrize("image_size,side,radius", [(32, 14, 5.0), (64, 29, 10.5)])
def test_a_blob_between_a_circle_and_a_square_is_unclear(image_size, side, radius):
    blob = _rounded_square(side, radius)
    fill = blob.mean()  # halfway from a circle (0.79) to a square (1)
    assert 0.88 < fill < 0.9
    x0 = (image_size - side) // 2
    image = _paint(_canvas(image_size), blob, x0, x0, "green")
    as_circle = _scene("green", "circle", "large", "center", (x0, x0, x0 + side, x0 + side))
    assert judge.judge(image, as_circle).correct  # the spec's reading takes it for a circle
    strict = judge.judge(image, as_circle, strict=True)
    assert not strict.correct and not strict.attributes["shape"]
    assert strict.attributes["color"] and strict.attributes["size"] and strict.attributes["cell"]
    assert strict.components[0].strict_shape == shape_reading.UNCLEAR
    as_square = _scene("green", "square", "large", "center", (x0, x0, x0 + side, x0 + side))
    for is_strict in (False, True):
        assert not judge.judge(image, as_square, strict=is_strict).correct


def test_the_neighbours_of_the_unclear_blob_are_read_as_circle_and_square():
    # The same family a little rounder and a little squarer: the unclear band is narrow, not a hole.
    assert shape_reading.read_strict(_rounded_square(29, 12.0)) == "circle"
    assert shape_reading.read_strict(_rounded_square(29, 9.0)) == "square"


@pytest.mark.parametrize("mask,spec_reading", [
    (np.ones((7, 14), bool), "square"),  # a 2:1 rectangle
    (np.ones((14, 7), bool), "square"),
    (_ellipse(7, 14), "circle"),  # a 2:1 ellipse
])
def test_a_two_to_one_region_is_neither_square_nor_circle(mask, spec_reading):
    image = _paint(_canvas(), mask, 9, 9, "blue")
    box = (9, 9, 9 + mask.shape[1], 9 + mask.shape[0])
    scene = _scene("blue", spec_reading, "large", "center", box)
    assert judge.judge(image, scene).correct
    strict = judge.judge(image, scene, strict=True)
    assert not strict.correct and not strict.attributes["shape"]
    assert strict.components[0].strict_shape == shape_reading.UNCLEAR


def _upside_down_triangle(side):
    return ss.shape_mask("triangle", side)[::-1]


def _diamond(side):
    centers = np.arange(side) + 0.5
    return np.abs(centers[:, None] - side / 2) + np.abs(centers[None, :] - side / 2) <= side / 2


def _quarter_disc(side):
    """A pie slice: its right angle at the top left, its arc at the bottom right."""
    centers = np.arange(side) + 0.5
    return centers[:, None] ** 2 + centers[None, :] ** 2 <= side**2


@pytest.mark.parametrize("make", [_upside_down_triangle, _diamond, _quarter_disc])
@pytest.mark.parametrize("side", [8, 14, 29])
def test_regions_like_no_dataset_shape_are_unclear_where_the_spec_says_circle(make, side):
    mask = make(side)
    assert shape_reading.read_spec(mask) == "circle"
    assert shape_reading.read_strict(mask) == shape_reading.UNCLEAR


def test_shape_features_of_an_empty_mask_fail_loudly():
    with pytest.raises(ValueError, match="non-empty 2-D mask"):
        shape_reading.ShapeFeatures.of(np.zeros((4, 4), bool))


def test_extra_object_area_is_half_the_smallest_object():
    assert judge.extra_object_min_area(32) == 20.0  # the small triangle: 40 pixels on an 8-pixel box
    for image_size in (32, 64, 128, 256):
        min_area = judge.extra_object_min_area(image_size)
        assert min_area >= judge.MIN_AREA_FRACTION * image_size**2  # every object-sized region is found
        for size in ss.SIZES:
            for shape in ss.SHAPES:
                (region,) = judge.find_regions(ss.render(_one_object("red", shape, size, "center", image_size),
                                                         image_size))
                assert region.area >= 2 * min_area - 1e-9


def _square_scene():
    return _one_object("red", "square", "small", "top left")


@pytest.mark.parametrize("strict", [False, True])
def test_a_square_with_an_extra_object_is_correct_but_not_exact(strict):
    scene = _square_scene()
    image = ss.render(scene, 32)
    assert judge.judge(image, scene, strict=strict).exact
    with_circle = _paint(image.copy(), ss.shape_mask("circle", 8), 22, 22, "blue")
    verdict = judge.judge(with_circle, scene, strict=strict)
    assert verdict.correct and not verdict.exact
    assert [(e.color, e.shape) for e in verdict.extras] == [("blue", "circle")]
    assert verdict.exact_attribute("color") is False and verdict.attributes["color"] is True
    # A second square of the named colour is just as much an extra object.
    twin = _paint(image.copy(), np.ones((8, 8), bool), 22, 22, "red")
    verdict = judge.judge(twin, scene, strict=strict)
    assert verdict.correct and not verdict.exact and len(verdict.extras) == 1


@pytest.mark.parametrize("strict", [False, True])
def test_specks_below_object_size_leave_an_image_exact(strict):
    scene = _square_scene()
    image = ss.render(scene, 32)
    image[20:23, 20:23] = ss.COLORS["blue"]  # 9 pixels: a decoder's speckle
    image[26:30, 3:7] = ss.COLORS["green"]  # 16 pixels, found as a region but under the 20 of an object
    image[2, 28] = ss.COLORS["yellow"]
    verdict = judge.judge(image, scene, strict=strict)
    assert verdict.exact and verdict.extras == ()
    image[26:31, 3:7] = ss.COLORS["green"]  # 20 pixels: as large as half the smallest object
    assert not judge.judge(image, scene, strict=strict).exact


def test_an_incorrect_image_is_not_exact_even_without_extras():
    scene = _square_scene()
    wrong = dict(scene, objects=[dict(scene["objects"][0], shape="circle")])
    verdict = judge.judge(ss.render(scene, 32), wrong, strict=True)
    assert verdict.extras == () and not verdict.correct and not verdict.exact
    assert verdict.exact_attribute("cell") and not verdict.exact_attribute("shape")


def test_a_two_object_scene_with_a_third_object_is_not_exact():
    left = _one_object("yellow", "triangle", "small", "left")["objects"][0]
    right = _one_object("purple", "circle", "small", "right")["objects"][0]
    scene = {"objects": [left, right], "relation": "to the left of"}
    image = ss.render(scene, 32)
    assert judge.judge(image, scene, strict=True).exact
    third = _paint(image.copy(), np.ones((8, 8), bool), 12, 24, "orange")
    verdict = judge.judge(third, scene, strict=True)
    assert verdict.correct and not verdict.exact
    assert [e.color for e in verdict.extras] == ["orange"]
