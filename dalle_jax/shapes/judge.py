"""Judges whether an image shows a captioned_shapes scene (numpy + scipy.ndimage).

Every pixel takes the nearest palette colour (palette plus background, counting blends of a colour with
the background as that colour once past half way). Connected regions of one colour
with a plausible area for an object become candidate components; each is read for its shape (fill ratio
of its box and where its width narrows), size (box side against 0.35 * S), cell and centre (the centre of
its box). A scene's objects are matched to components of their colour, choosing the assignment that
satisfies the most stated attributes, so extra speckles or stray blobs do not hide a correct object.

Two shape readings (`dalle_jax.shapes.shape_reading`): the spec's (`strict=False`, the default), which calls
any region that is neither triangle nor square a circle, and the strict one (`strict=True`), which answers
`unclear` (always wrong) for a region that looks like none of the three. Either way a judgement also names the
`extras`: object-sized regions (at least half the area of the smallest object the dataset draws at this canvas
size) that no object was matched to; a judgement is `exact` when it is correct and has none.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Mapping

import numpy as np
from scipy import ndimage

from dalle_jax.data import shapes_scene
from dalle_jax.shapes import shape_reading

ATTRIBUTES = ("color", "shape", "size", "cell", "relation")
PALETTE_NAMES = ("background",) + tuple(shapes_scene.COLORS)
_PALETTE = np.array([shapes_scene.BACKGROUND] + list(shapes_scene.COLORS.values()), dtype=np.float32)

# Component areas, as fractions of S^2, that can be an object: the smallest object is a small triangle
# (~0.031 S^2) and the largest a large square (~0.2 S^2); the bounds leave room for blur and erosion.
MIN_AREA_FRACTION = 0.01
MAX_AREA_FRACTION = 0.3
# A component that fills less of its box than this is a ring or streak of edge colours, not an object.
MIN_FILL = 0.3
LARGE_SIDE_FRACTION = 0.35
# A relation needs the centres this far apart (in units of S) along its axis.
RELATION_MARGIN_FRACTION = 1 / 16
# A region counts as an extra object from half the area of the smallest object the dataset draws: a VQGAN's
# speckles stay below it, any drawn shape is above it.
EXTRA_OBJECT_AREA_SHARE = 0.5
_SPECKLE_BLOCK = np.ones((2, 2), dtype=bool)


@dataclasses.dataclass(frozen=True)
class Component:
    """A connected region of one palette colour, read as a possible object."""

    color: str
    area: int
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive at the high end
    center: tuple[float, float]  # (x, y) centre of the box
    shape: str  # the spec's reading
    size: str
    cell: str
    strict_shape: str  # the strict reading: a shape, or "unclear"
    fill: float  # share of its box the region covers

    def shape_read(self, strict: bool) -> str:
        return self.strict_shape if strict else self.shape


@dataclasses.dataclass(frozen=True)
class Judgement:
    """The verdict on one image: `attributes` holds one boolean per judged attribute."""

    correct: bool
    attributes: dict[str, bool]
    components: tuple[Component | None, ...]  # the component matched to each object, None if none
    extras: tuple[Component, ...] = ()  # object-sized regions matched to no object

    @property
    def exact(self) -> bool:
        """Correct, and nothing object-sized drawn beyond the scene's objects."""
        return self.correct and not self.extras

    def exact_attribute(self, name: str) -> bool:
        """Attribute `name` right, and nothing object-sized drawn beyond the scene's objects."""
        return self.attributes[name] and not self.extras


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(
            f"image of dtype {image.dtype} and shape {image.shape} cannot be judged: pass a square uint8 "
            "(S, S, 3) RGB array."
        )
    if image.shape[0] < shapes_scene.MIN_IMAGE_SIZE:
        raise ValueError(f"image side {image.shape[0]} is below {shapes_scene.MIN_IMAGE_SIZE} pixels.")
    return image


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(S, S) index into PALETTE_NAMES of each pixel's colour.

    Each palette colour stands for itself and its blends with the background, because blurred or
    reconstructed edges are such blends: a pixel takes the palette colour whose blend line passes nearest
    to it in RGB, and counts as that colour when it is at least half way from the background to it.
    Pure palette and background pixels get their own colour, as with a plain nearest-colour rule.
    """
    pixels = _check_image(image).astype(np.float32) - _PALETTE[0]
    directions = _PALETTE[1:] - _PALETTE[0]  # (colours, 3)
    alpha = np.clip(pixels @ directions.T / (directions**2).sum(-1), 0.0, 1.0)  # (S, S, colours)
    residual = pixels[:, :, None, :] - alpha[..., None] * directions
    nearest = (residual**2).sum(-1).argmin(-1)
    coverage = np.take_along_axis(alpha, nearest[..., None], -1)[..., 0]
    return np.where(coverage >= 0.5, nearest + 1, 0)


def read_shape(mask: np.ndarray, strict: bool = False) -> str:
    """Shape of a boolean mask cropped to its bounding box: the spec's reading, or with `strict` the strict one
    (which may be "unclear")."""
    return shape_reading.read_strict(mask) if strict else shape_reading.read_spec(mask)


def extra_object_min_area(image_size: int) -> float:
    """The least area (pixels) of a region that counts as an object: EXTRA_OBJECT_AREA_SHARE of the smallest
    object the dataset draws on an `image_size` canvas."""
    side = shapes_scene.box_side("small", image_size)
    return EXTRA_OBJECT_AREA_SHARE * min(int(shapes_scene.shape_mask(s, side).sum()) for s in shapes_scene.SHAPES)


def _cell_of(center: tuple[float, float], image_size: int) -> str:
    col, row = (min(int(v * 3 // image_size), 2) for v in center)
    return shapes_scene.CELLS[3 * row + col]


def find_regions(image: np.ndarray) -> list[Component]:
    """Every region of one palette colour at least MIN_AREA_FRACTION * S^2 in area (after dropping lone pixels
    and filling holes), of every palette colour, read as if it were an object."""
    labels = palette_labels(image)
    size = labels.shape[0]
    regions_found = []
    for index, color in enumerate(PALETTE_NAMES[1:], start=1):
        # Opening with a 2x2 block drops lone pixels and 1-pixel spurs that would stretch an object's box.
        mask = ndimage.binary_opening(labels == index, structure=_SPECKLE_BLOCK)
        regions, count = ndimage.label(mask)
        for label, slices in enumerate(ndimage.find_objects(regions), start=1):
            if slices is None:
                continue
            # Holes from noisy pixels inside an object still belong to it.
            mask = ndimage.binary_fill_holes(regions[slices] == label)
            area = int(mask.sum())
            if area < MIN_AREA_FRACTION * size * size:
                continue
            y, x = slices
            box = (x.start, y.start, x.stop, y.stop)
            center = ((x.start + x.stop) / 2.0, (y.start + y.stop) / 2.0)
            side = max(x.stop - x.start, y.stop - y.start)
            regions_found.append(
                Component(
                    color=color,
                    area=area,
                    box=box,
                    center=center,
                    shape=read_shape(mask),
                    size="large" if side > LARGE_SIDE_FRACTION * size else "small",
                    cell=_cell_of(center, size),
                    strict_shape=read_shape(mask, strict=True),
                    fill=float(mask.mean()),
                )
            )
    return regions_found


def _plausible(region: Component, image_size: int) -> bool:
    area = image_size * image_size
    return MIN_AREA_FRACTION * area <= region.area <= MAX_AREA_FRACTION * area and region.fill >= MIN_FILL


def find_components(image: np.ndarray) -> list[Component]:
    """All components of plausible area and compactness, of every palette colour."""
    image = _check_image(image)
    return [r for r in find_regions(image) if _plausible(r, image.shape[0])]


def relation_holds(relation: str, center0, center1, image_size: int) -> bool:
    """Whether a component centred at `center0` stands in `relation` to one centred at `center1`."""
    margin = RELATION_MARGIN_FRACTION * image_size
    (x0, y0), (x1, y1) = center0, center1
    checks = {
        "to the left of": x0 + margin < x1,
        "to the right of": x0 > x1 + margin,
        "above": y0 + margin < y1,
        "below": y0 > y1 + margin,
    }
    if relation not in checks:
        raise ValueError(f"relation={relation!r} cannot be judged: use one of {tuple(checks)}.")
    return checks[relation]


def default_attributes(scene: dict) -> frozenset[str]:
    """What the canonical caption states: colour, shape, size and cell of one object, or the colours,
    shapes and relation of two."""
    if len(scene["objects"]) == 1:
        return frozenset({"color", "shape", "size", "cell"})
    return frozenset({"color", "shape", "relation"})


def judge(image: np.ndarray, scene: Mapping, attributes: Iterable[str] | None = None, *,
          strict: bool = False) -> Judgement:
    """Judges `image` (uint8 (S, S, 3)) against `scene` (a shapes_scene dict or a decoded TFDS example).

    `attributes` names what the caption states (see `shapes_scene.stated_attributes`); by default those of
    the canonical caption. Colour and shape are always judged, shape by the spec's reading or, with `strict`,
    by the strict one.
    """
    image = _check_image(image)
    scene = shapes_scene.scene_from_example(scene)
    judged = default_attributes(scene) if attributes is None else frozenset(attributes) | {"color", "shape"}
    unknown = judged - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"attributes {sorted(unknown)} are unknown: use names from {ATTRIBUTES}.")
    objects = scene["objects"]
    if len(objects) == 1:
        judged -= {"relation"}
    size = image.shape[0]
    regions = find_regions(image)
    components = [r for r in regions if _plausible(r, size)]
    per_object = [key for key in ("size", "cell") if key in judged]

    # None stands for "no component": an object of a colour that is absent, or a second object of one colour.
    candidates = [[c for c in components if c.color == obj["color"]] + [None] for obj in objects]
    best, best_key = None, None
    for chosen in itertools.product(*candidates):
        if len(chosen) == 2 and chosen[0] is not None and chosen[0] is chosen[1]:
            continue
        checks = {key: [] for key in judged}
        for obj, comp in zip(objects, chosen):
            checks["color"].append(comp is not None)
            checks["shape"].append(comp is not None and comp.shape_read(strict) == obj["shape"])
            for key in per_object:
                checks[key].append(comp is not None and getattr(comp, key) == obj[key])
        if "relation" in judged:
            checks["relation"].append(
                None not in chosen and relation_holds(scene["relation"], chosen[0].center, chosen[1].center, size)
            )
        score = sum(sum(v) for v in checks.values())
        key = (score, sum(c.area for c in chosen if c is not None))
        if best_key is None or key > best_key:
            best, best_key = (chosen, checks), key
    chosen, checks = best
    verdicts = {key: all(checks[key]) for key in ATTRIBUTES if key in judged}
    min_extra = extra_object_min_area(size)
    extras = tuple(r for r in regions if r.area >= min_extra and not any(r is c for c in chosen))
    return Judgement(correct=all(verdicts.values()), attributes=verdicts, components=tuple(chosen), extras=extras)


def aggregate(judgements: Iterable[Judgement]) -> dict[str, float]:
    """Accuracy overall (`correct`) and per attribute over the judgements that judged it, plus `count`."""
    judgements = list(judgements)
    if not judgements:
        raise ValueError("aggregate needs at least one judgement.")
    result = {"correct": float(np.mean([j.correct for j in judgements])), "count": float(len(judgements))}
    for key in ATTRIBUTES:
        values = [j.attributes[key] for j in judgements if key in j.attributes]
        if values:
            result[key] = float(np.mean(values))
    return result
