"""Tests for captioned_shapes scenes: sampling rules, rendering, captions."""
import re

import numpy as np
import pytest

from dalle_jax.data import shapes_scene as ss

PALETTE = {tuple(v) for v in ss.COLORS.values()} | {ss.BACKGROUND}


def _scenes(image_size, count, held_out, seed=0):
    rng = np.random.default_rng(seed)
    return [ss.sample_scene(rng, image_size, held_out) for _ in range(count)]


def test_constants_follow_the_spec():
    assert list(ss.COLORS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert ss.COLORS["orange"] == (245, 130, 20) and ss.BACKGROUND == (240, 240, 240)
    assert ss.SHAPES == ("circle", "square", "triangle") and ss.SIZES == ("small", "large")
    assert ss.CELLS[0] == "top left" and ss.CELLS[4] == "center" and ss.CELLS[8] == "bottom right"
    assert set(ss.HELD_OUT) == {("green", "triangle"), ("purple", "circle"), ("orange", "square")}
    assert [ss.box_side(z, 64) for z in ss.SIZES] == [16, 29]
    assert [ss.box_side(z, 32) for z in ss.SIZES] == [8, 14]


@pytest.mark.parametrize("image_size", [32, 64])
def test_sampled_scenes_obey_placement_rules(image_size):
    s = image_size
    scenes = _scenes(s, 300, "exclude", seed=s)
    for scene in scenes:
        objects = scene["objects"]
        assert len(objects) in (1, 2)
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s
            assert x1 - x0 == y1 - y0 == round(ss.SIZE_FRACTIONS[obj["size"]] * s)
            row, col = divmod(ss.CELLS.index(obj["cell"]), 3)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            for center, k, at_edge in ((cx, col, x0 == 0 or x1 == s), (cy, row, y0 == 0 or y1 == s)):
                assert int(center * 3 // s) == k  # the centre lies in its cell
                if not at_edge:  # not clamped: cell centre plus at most S/16 (and half a pixel of rounding)
                    assert abs(center - (2 * k + 1) * s / 6) <= s / 16 + 0.5
        if len(objects) == 2:
            a, b = objects
            assert a["cell"] != b["cell"]
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, "boxes overlap"
            (acx, acy), (bcx, bcy) = ss.box_center(a["box"]), ss.box_center(b["box"])
            truth = {"to the left of": acx < bcx, "to the right of": acx > bcx, "above": acy < bcy, "below": acy > bcy}
            assert truth[scene["relation"]]
            (ar, ac), (br, bc) = ss.cell_row_col(a["cell"]), ss.cell_row_col(b["cell"])
            if ar == br:
                assert scene["relation"] in ("to the left of", "to the right of")
            if ac == bc:
                assert scene["relation"] in ("above", "below")
        else:
            assert scene["relation"] == "none"


def test_object_count_and_attribute_frequencies():
    scenes = _scenes(32, 1500, "exclude", seed=7)
    one = np.mean([len(s["objects"]) == 1 for s in scenes])
    assert abs(one - 0.6) < 0.05
    objects = [o for s in scenes for o in s["objects"]]
    assert {o["color"] for o in objects} == set(ss.COLORS)
    assert {o["shape"] for o in objects} == set(ss.SHAPES)
    assert {o["cell"] for o in objects} == set(ss.CELLS)
    relations = {s["relation"] for s in scenes}
    assert relations == set(ss.RELATIONS)


def test_held_out_pairs_are_excluded_or_required():
    for scene in _scenes(32, 600, "exclude", seed=1):
        assert not any((o["color"], o["shape"]) in ss.HELD_OUT for o in scene["objects"])
    required = _scenes(32, 300, "require", seed=2)
    for scene in required:
        assert any((o["color"], o["shape"]) in ss.HELD_OUT for o in scene["objects"])
    seen = {(o["color"], o["shape"]) for s in required for o in s["objects"]}
    assert set(ss.HELD_OUT) <= seen


@pytest.mark.parametrize("image_size", [32, 64])
def test_render_uses_only_the_palette_with_each_object_inside_its_box(image_size):
    for scene in _scenes(image_size, 100, "exclude", seed=3):
        image = ss.render(scene, image_size)
        assert image.dtype == np.uint8 and image.shape == (image_size, image_size, 3)
        assert {tuple(p) for p in np.unique(image.reshape(-1, 3), axis=0).tolist()} <= PALETTE
        outside = np.ones(image.shape[:2], bool)
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["box"]
            outside[y0:y1, x0:x1] = False
            region = image[y0:y1, x0:x1]
            # The shape reaches all four sides of its box, in its own colour only.
            filled = np.all(region == ss.COLORS[obj["color"]], axis=-1)
            assert filled.any(0).all() and filled.any(1).all()
            assert np.all(filled | np.all(region == ss.BACKGROUND, axis=-1))
        assert np.all(image[outside] == ss.BACKGROUND)


@pytest.mark.parametrize("side", [8, 14, 16, 29, 58])
def test_shape_masks_have_their_geometry(side):
    square, circle, triangle = (ss.shape_mask(s, side) for s in ("square", "circle", "triangle"))
    assert square.all()
    # Circle: symmetric under both flips and a transpose, fill close to pi / 4.
    assert np.array_equal(circle, circle[::-1]) and np.array_equal(circle, circle[:, ::-1])
    assert np.array_equal(circle, circle.T)
    assert abs(circle.mean() - np.pi / 4) < 0.04
    # Triangle: left-right symmetric, apex at the top, widening downwards to a full base.
    widths = triangle.sum(1)
    assert np.array_equal(triangle, triangle[:, ::-1])
    assert widths[0] <= 2 and widths[-1] == side and np.all(np.diff(widths) >= 0)
    assert abs(triangle.mean() - 0.5) < 1.0 / side + 0.01
    for mask in (square, circle, triangle):  # each row is one contiguous run
        for row in mask:
            runs = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
            assert len(runs) in (0, 2)


def test_sampling_and_rendering_are_deterministic():
    a = _scenes(64, 50, "require", seed=11)
    b = _scenes(64, 50, "require", seed=11)
    assert a == b
    assert all(ss.render(x, 64).tobytes() == ss.render(y, 64).tobytes() for x, y in zip(a, b))


def test_canonical_captions():
    one = {
        "objects": [{"color": "red", "shape": "circle", "size": "small", "cell": "top left", "box": (0, 0, 8, 8)}],
        "relation": "none",
    }
    assert ss.canonical_caption(one) == "a small red circle in the top left"
    two = {
        "objects": [
            {"color": "red", "shape": "circle", "size": "small", "cell": "left", "box": (2, 12, 10, 20)},
            {"color": "blue", "shape": "square", "size": "large", "cell": "right", "box": (18, 9, 32, 23)},
        ],
        "relation": "to the left of",
    }
    assert ss.canonical_caption(two) == "a red circle to the left of a blue square"


def _mentioned_facts(caption):
    """Colours, shapes, sizes and cells a caption names (relation phrases removed before cells)."""
    text = caption
    relations = [r for r in ss.RELATIONS[1:] if r in text]
    for r in relations:
        text = text.replace(r, " ")
    cells = set(re.findall(r"\b(?:top left|top right|bottom left|bottom right|top|bottom|left|right|center)\b", text))
    words = set(caption.replace(",", " ").split())
    return words & set(ss.COLORS), words & set(ss.SHAPES), words & set(ss.SIZES), cells, relations


def test_paraphrases_state_every_colour_and_shape_and_only_true_facts():
    rng = np.random.default_rng(5)
    for _ in range(300):
        scene = ss.sample_scene(rng, 32)
        captions = ss.paraphrases(scene, rng)
        assert captions[0] == ss.canonical_caption(scene)
        assert len(captions) == len(set(captions)) == 5
        objects = scene["objects"]
        for caption in captions:
            colors, shapes, sizes, cells, relations = _mentioned_facts(caption)
            assert colors == {o["color"] for o in objects} and shapes == {o["shape"] for o in objects}, caption
            assert sizes <= {o["size"] for o in objects}, caption
            assert cells <= {o["cell"] for o in objects}, caption
            if relations:
                assert len(relations) == 1 and _relation_is_true(caption, relations[0], scene), caption


def _relation_is_true(caption, relation, scene):
    """Reads `subject relation reference` from a caption and checks it against the scene."""
    pattern = rf"({'|'.join(ss.COLORS)}) ({'|'.join(ss.SHAPES)})"
    mentions = [(m.start(), (m.group(1), m.group(2))) for m in re.finditer(pattern, caption)]
    at = caption.index(relation)
    before = [pair for start, pair in mentions if start < at]
    # "X REL Y", "Y with X REL it", or "REL Y there is X".
    subject = before[-1] if before else mentions[-1][1]
    pairs = [(o["color"], o["shape"]) for o in scene["objects"]]
    if pairs[0] == pairs[1]:
        return relation in (scene["relation"], ss.INVERSE_RELATION[scene["relation"]])
    truth = scene["relation"] if subject == pairs[0] else ss.INVERSE_RELATION[scene["relation"]]
    return relation == truth


def test_paraphrases_are_deterministic_and_count_is_respected():
    scene = ss.sample_scene(np.random.default_rng(3), 32)
    assert ss.paraphrases(scene, np.random.default_rng(9)) == ss.paraphrases(scene, np.random.default_rng(9))
    assert ss.paraphrases(scene, np.random.default_rng(9), count=0) == [ss.canonical_caption(scene)]
    with pytest.raises(ValueError, match="count"):
        ss.paraphrases(scene, np.random.default_rng(9), count=-1)


def test_stated_attributes():
    assert ss.stated_attributes("a small red circle in the top left") == {"color", "shape", "size", "cell"}
    assert ss.stated_attributes("a red circle to the left of a blue square") == {"color", "shape", "relation"}
    assert ss.stated_attributes("a red circle") == {"color", "shape"}
    assert ss.stated_attributes("a large red circle below a small blue square") == {
        "color", "shape", "size", "relation"}
    assert ss.stated_attributes("a red circle in the left and a blue square in the center") == {
        "color", "shape", "cell"}


def test_bad_input_fails_loudly():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image_size"):
        ss.sample_scene(rng, 8)
    with pytest.raises(ValueError, match="image_size"):
        ss.sample_scene(rng, 32.0)
    with pytest.raises(ValueError, match="held_out"):
        ss.sample_scene(rng, 32, held_out="only")
    scene = ss.sample_scene(rng, 32)
    scene["objects"][0]["color"] = "pink"
    with pytest.raises(ValueError, match="pink"):
        ss.render(scene, 32)
    scene["objects"][0].update(color="red", box=(30, 0, 40, 10))
    with pytest.raises(ValueError, match="box"):
        ss.render(scene, 32)
    with pytest.raises(ValueError, match="size"):
        ss.box_side("medium", 32)
