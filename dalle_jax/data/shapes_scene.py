"""Scenes of the captioned_shapes dataset: sampling, rendering and captions (pure numpy).

A scene is a dict `{"objects": [object, ...], "relation": str}`. Each object is a dict
`{"color", "shape", "size", "cell", "box"}` where `box = (x0, y0, x1, y1)` in pixels, exclusive at the
high end. `relation` is how object 0 stands to object 1 ("none" for a one-object scene). The rules are
those of the captioned_shapes spec (palette, sizes, 3x3 cells, held-out colour/shape pairs).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Mapping

import numpy as np

BACKGROUND = (240, 240, 240)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIZE_FRACTIONS = {"small": 0.25, "large": 0.45}
# Row-major over the 3x3 grid; the middle row drops "middle" and the centre column drops "center".
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("none", "to the left of", "to the right of", "above", "below")
INVERSE_RELATION = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
# (colour, shape) pairs kept out of train/validation/test and present in every scene of the *_compositional splits.
HELD_OUT = (("green", "triangle"), ("purple", "circle"), ("orange", "square"))
HELD_OUT_MODES = ("exclude", "require")
ONE_OBJECT_PROBABILITY = 0.6
MIN_IMAGE_SIZE = 16

_ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
_ALLOWED_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELD_OUT)
_MAX_PLACEMENT_TRIES = 1000


def check_image_size(image_size) -> int:
    """Returns `image_size` as an int, or raises if it cannot hold a scene."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size!r} is not supported: pass an integer canvas side >= {MIN_IMAGE_SIZE} "
            "(the built configs use 32, 64, 128 or 256)."
        )
    return int(image_size)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def box_side(size: str, image_size: int) -> int:
    """Side in pixels of an object's box: round(0.25 * S) for small, round(0.45 * S) for large."""
    if size not in SIZE_FRACTIONS:
        raise ValueError(f"size={size!r} is not one of {SIZES}.")
    return _round_half_up(SIZE_FRACTIONS[size] * image_size)


def cell_row_col(cell: str) -> tuple[int, int]:
    """(row, column) of a cell in the 3x3 grid, each in 0..2."""
    if cell not in CELLS:
        raise ValueError(f"cell={cell!r} is not one of {CELLS}.")
    return divmod(CELLS.index(cell), 3)


def box_center(box) -> tuple[float, float]:
    """(x, y) centre of an exclusive `(x0, y0, x1, y1)` box."""
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0


def _place_box(cell: str, side: int, image_size: int, jitter: tuple[float, float]) -> tuple[int, int, int, int]:
    """Box of `side` centred on the cell centre plus `jitter` (fractions of S/16), kept inside the canvas."""
    row, col = cell_row_col(cell)
    corner = []
    for k, j in ((col, jitter[0]), (row, jitter[1])):
        center = (2 * k + 1) * image_size / 6.0 + j * image_size / 16.0
        corner.append(min(max(_round_half_up(center - side / 2.0), 0), image_size - side))
    x0, y0 = corner
    return (x0, y0, x0 + side, y0 + side)


def _boxes_apart(a, b, gap: int) -> bool:
    """True when the boxes are at least `gap` pixels apart along some axis (so they cannot touch)."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def relation_choices(box0, box1, cell0: str, cell1: str) -> list[str]:
    """Relations of object 0 to object 1 that are true of their box centres and fit their cells."""
    (x0, y0), (x1, y1) = box_center(box0), box_center(box1)
    (r0, c0), (r1, c1) = cell_row_col(cell0), cell_row_col(cell1)
    horizontal = "to the left of" if x0 < x1 else "to the right of"
    vertical = "above" if y0 < y1 else "below"
    if r0 == r1:
        return [horizontal]
    if c0 == c1:
        return [vertical]
    return [horizontal, vertical]


def sample_scene(rng: np.random.Generator, image_size: int, held_out: str = "exclude") -> dict:
    """Draws a scene for an `image_size` canvas.

    `held_out="exclude"` never uses a HELD_OUT (colour, shape) pair (train/validation/test);
    `"require"` puts one on at least one object (validation_compositional, test_compositional).
    """
    image_size = check_image_size(image_size)
    if held_out not in HELD_OUT_MODES:
        raise ValueError(f"held_out={held_out!r} is not one of {HELD_OUT_MODES}.")
    # Uniform draws mapped to choices by hand: one vector draw is much cheaper than many small rng calls.
    u = rng.random(5).tolist()
    num_objects = 1 if u[0] < ONE_OBJECT_PROBABILITY else 2
    if held_out == "exclude":
        pairs = [_ALLOWED_PAIRS[int(x * len(_ALLOWED_PAIRS))] for x in u[1 : 1 + num_objects]]
    else:
        pairs = [_ALL_PAIRS[int(x * len(_ALL_PAIRS))] for x in u[1 : 1 + num_objects]]
        pairs[int(u[3] * num_objects)] = HELD_OUT[int(u[4] * len(HELD_OUT))]

    # Boxes keep a small gap, so two objects of one colour never touch and stay separate components.
    gap = max(1, _round_half_up(image_size / 32))
    for _ in range(_MAX_PLACEMENT_TRIES):
        v = rng.random(8).tolist()
        first = int(v[0] * len(CELLS))
        cells = [CELLS[first], CELLS[(first + 1 + int(v[1] * (len(CELLS) - 1))) % len(CELLS)]][:num_objects]
        sizes = [SIZES[int(x * len(SIZES))] for x in v[2 : 2 + num_objects]]
        jitters = [(2.0 * v[4] - 1.0, 2.0 * v[5] - 1.0), (2.0 * v[6] - 1.0, 2.0 * v[7] - 1.0)]
        boxes = [_place_box(c, box_side(z, image_size), image_size, j) for c, z, j in zip(cells, sizes, jitters)]
        if num_objects == 1 or _boxes_apart(boxes[0], boxes[1], gap):
            break
    else:
        raise RuntimeError(f"could not place {num_objects} objects apart on a {image_size}px canvas.")

    objects = [
        {"color": color, "shape": shape, "size": size, "cell": cell, "box": box}
        for (color, shape), size, cell, box in zip(pairs, sizes, cells, boxes)
    ]
    relation = "none"
    if num_objects == 2:
        choices = relation_choices(boxes[0], boxes[1], cells[0], cells[1])
        relation = choices[int(rng.random() * len(choices))]
    return {"objects": objects, "relation": relation}


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape filling its box, sampled at pixel centres."""
    centers = np.arange(side) + 0.5
    y, x = centers[:, None], centers[None, :]
    half = side / 2.0
    if shape == "circle":
        mask = (x - half) ** 2 + (y - half) ** 2 <= half**2
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        # Half-width taken at each row's lower edge, so the apex row is drawn and the base spans the box.
        mask = np.abs(x - half) <= (y + 0.5) / 2.0
    else:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}.")
    mask.flags.writeable = False
    return mask


def render(scene: dict, image_size: int) -> np.ndarray:
    """Draws a scene with hard edges: uint8 (S, S, 3), palette colours on the background."""
    image_size = check_image_size(image_size)
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[...] = BACKGROUND
    for obj in scene["objects"]:
        x0, y0, x1, y1 = (int(v) for v in obj["box"])
        if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size and x1 - x0 == y1 - y0):
            raise ValueError(f"box={obj['box']!r} is not a square inside a {image_size}px canvas.")
        if obj["color"] not in COLORS:
            raise ValueError(f"color={obj['color']!r} is not one of {tuple(COLORS)}.")
        region = image[y0:y1, x0:x1]
        region[shape_mask(obj["shape"], x1 - x0)] = COLORS[obj["color"]]
    return image


def canonical_caption(scene: dict) -> str:
    """`a {size} {color} {shape} in the {cell}`, or `a {color} {shape} {relation} a {color} {shape}`."""
    objects = scene["objects"]
    if len(objects) == 1:
        o = objects[0]
        return f"a {o['size']} {o['color']} {o['shape']} in the {o['cell']}"
    if len(objects) == 2:
        a, b = objects
        return f"a {a['color']} {a['shape']} {scene['relation']} a {b['color']} {b['shape']}"
    raise ValueError(f"a scene has 1 or 2 objects, got {len(objects)}.")


_ONE_OBJECT_TEMPLATES = (
    "a {color} {shape} in the {cell}",
    "a {size} {color} {shape}",
    "a {color} {shape}",
    "in the {cell}, a {size} {color} {shape}",
    "in the {cell}, a {color} {shape}",
    "there is a {size} {color} {shape} in the {cell}",
    "a {size} {shape} in {color} in the {cell}",
    "a {color} {shape} of {size} size",
    "the {cell} holds a {size} {color} {shape}",
    "a {shape}, {color} and {size}, in the {cell}",
)
_TWO_OBJECT_TEMPLATES = (
    "a {color1} {shape1} {inverse} a {color0} {shape0}",
    "a {size0} {color0} {shape0} {relation} a {size1} {color1} {shape1}",
    "a {size1} {color1} {shape1} {inverse} a {size0} {color0} {shape0}",
    "there is a {color0} {shape0} {relation} a {color1} {shape1}",
    "a {color0} {shape0} in the {cell0} and a {color1} {shape1} in the {cell1}",
    "a {size0} {color0} {shape0} in the {cell0} and a {size1} {color1} {shape1} in the {cell1}",
    "a {color1} {shape1} with a {color0} {shape0} {relation} it",
    "{relation} a {color1} {shape1} there is a {color0} {shape0}",
)


def paraphrases(scene: dict, rng: np.random.Generator, count: int = 4) -> list[str]:
    """The canonical caption followed by up to `count` other phrasings drawn by `rng`.

    Paraphrases may leave out the size and/or the cell, but each names every colour and shape.
    """
    if count < 0:
        raise ValueError(f"count={count} must be >= 0.")
    objects = scene["objects"]
    canonical = canonical_caption(scene)
    if len(objects) == 1:
        fields = dict(objects[0])
        templates = _ONE_OBJECT_TEMPLATES
    else:
        a, b = objects
        relation = scene["relation"]
        if relation not in INVERSE_RELATION:
            raise ValueError(f"relation={relation!r} of a two-object scene must be one of {RELATIONS[1:]}.")
        fields = {f"{k}{i}": o[k] for i, o in enumerate(objects) for k in ("color", "shape", "size", "cell")}
        fields.update(relation=relation, inverse=INVERSE_RELATION[relation])
        templates = _TWO_OBJECT_TEMPLATES
    others = []
    for i in rng.permutation(len(templates)):
        if len(others) == count:
            break
        caption = templates[i].format(**fields)
        if caption != canonical and caption not in others:
            others.append(caption)
    return [canonical] + others


_CELL_WORDS = re.compile(r"\b(top|bottom|left|right|center)\b")


def stated_attributes(caption: str) -> frozenset[str]:
    """Which attributes a caption states, among color, shape, size, cell and relation.

    Colours and shapes are always stated; the rest are read from the words present.
    """
    text = caption.lower()
    stated = {"color", "shape"}
    if any(re.search(rf"\b{size}\b", text) for size in SIZES):
        stated.add("size")
    for relation in RELATIONS[1:]:
        if re.search(rf"\b{relation}\b", text):
            stated.add("relation")
            text = re.sub(rf"\b{relation}\b", " ", text)
    if _CELL_WORDS.search(text):
        stated.add("cell")
    return frozenset(stated)


def _decode_name(value, names: tuple[str, ...], field: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        if value not in names:
            raise ValueError(f"{field}={value!r} is not one of {names}.")
        return value
    index = int(value)
    if not 0 <= index < len(names):
        raise ValueError(f"{field}={index} is out of range for the {len(names)} names {names}.")
    return names[index]


def scene_from_example(example: Mapping) -> dict:
    """A scene dict from a decoded captioned_shapes example (ClassLabel ids or names, objects as columns).

    A scene already in the shapes_scene form (objects as a list of dicts) is validated and returned as one.
    """
    objects = example["objects"]
    if isinstance(objects, Mapping):
        count = len(objects["color"])
        objects = [{key: objects[key][i] for key in objects} for i in range(count)]
    fields = {
        "color": tuple(COLORS),
        "shape": SHAPES,
        "size": SIZES,
        "cell": CELLS,
    }
    scene_objects = []
    for obj in objects:
        decoded = {key: _decode_name(obj[key], names, key) for key, names in fields.items()}
        decoded["box"] = tuple(int(v) for v in obj["box"])
        scene_objects.append(decoded)
    if len(scene_objects) not in (1, 2):
        raise ValueError(f"a scene has 1 or 2 objects, got {len(scene_objects)}.")
    relation = _decode_name(example.get("relation", "none"), RELATIONS, "relation")
    if (relation == "none") != (len(scene_objects) == 1):
        raise ValueError(f"relation={relation!r} does not fit a scene of {len(scene_objects)} object(s).")
    return {"objects": scene_objects, "relation": relation}
