"""Reading a region's shape from its mask: the spec's reading, and a strict one that can answer `unclear`.

The spec's reading (`read_spec`) looks for a triangle, then a square, and calls anything else a circle, so a
2:1 rectangle or a blob halfway between a circle and a square passes as a circle. The strict reading
(`read_strict`) names a shape only when every feature fits that shape as the dataset draws it:

- `aspect`: the box's short side over its long side; every dataset shape has a square box;
- `fill`: the share of its box the region covers (circle ~0.79, square 1, triangle ~0.5);
- where it narrows: the mean width of the outer quarter of rows (`top`, `bottom`) and of columns (`left`,
  `right`), relative to the widest row or column. A circle narrows on all four sides alike, a triangle towards
  its apex and on both sides, a square nowhere.

The bounds were fitted on the dataset's own shapes at every size it renders (box sides 4 to 115 pixels, for
canvases of 16 to 256), after the judge's 2x2 opening, and on the same scenes blurred and noised; each bound
leaves a margin beyond the widest value those took (see tests/shapes/test_judge_strict.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

UNCLEAR = "unclear"

# The spec's reading (captioned_shapes.md): a triangle widens this much from its top quarter of rows to its
# bottom quarter; otherwise a square fills this much of its box; anything else is a circle.
SPEC_TRIANGLE_MIN_WIDENING = 0.3
SPEC_SQUARE_MIN_FILL = 0.9

# The strict reading. Rendered shapes take: aspect >= 0.86 (a triangle's apex row can be lost to the opening);
# circle fill 0.75-0.81, outer bands 0.43-0.66; square fill 1, bands 1; triangle fill 0.51-0.75, top band
# 0.14-0.5, bottom band 0.89-1, side bands 0.25-0.5. Blur and noise move none of these by more than 0.1 at a
# box side of 8 or more. Each bound below keeps a margin of 0.05 or more beyond those values.
STRICT_MIN_ASPECT = 0.75
# Fill keeps circle and square apart; a region filling between 0.88 and 0.9 of its box is about halfway from
# one to the other (0.79 and 1), so neither. A VQGAN decodes an 8-pixel circle filling up to 56/64 = 0.875.
CIRCLE_FILL = (0.68, 0.88)
# A circle narrows on all four sides. The upper bound is loose because a row of an 8-pixel circle that gains a
# pixel at each end moves its band by 0.125.
CIRCLE_BAND = (0.3, 0.9)
# Opposite bands of a circle match; a region wide at one end and narrow at the other is no circle.
CIRCLE_MAX_BAND_DIFFERENCE = 0.25
SQUARE_MIN_FILL = 0.9
SQUARE_MIN_BAND = 0.75
TRIANGLE_FILL = (0.4, 0.8)
TRIANGLE_MAX_TOP = 0.6
TRIANGLE_MIN_BOTTOM = 0.8
TRIANGLE_MAX_SIDE = 0.65
# A side band of a 7-pixel triangle is one column, which one pixel moves by 0.14.
TRIANGLE_MAX_SIDE_DIFFERENCE = 0.3


@dataclasses.dataclass(frozen=True)
class ShapeFeatures:
    """What both readings look at, from a boolean mask cropped to its bounding box."""

    aspect: float
    fill: float
    top: float
    bottom: float
    left: float
    right: float

    @classmethod
    def of(cls, mask: np.ndarray) -> "ShapeFeatures":
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2 or not mask.any():
            raise ValueError(f"a shape is read from a non-empty 2-D mask, got shape {mask.shape} with "
                             f"{int(mask.sum())} pixels set.")
        height, width = mask.shape
        rows, cols = mask.sum(1) / mask.sum(1).max(), mask.sum(0) / mask.sum(0).max()
        band_rows, band_cols = max(1, height // 4), max(1, width // 4)
        return cls(aspect=min(height, width) / max(height, width), fill=float(mask.mean()),
                   top=float(rows[:band_rows].mean()), bottom=float(rows[-band_rows:].mean()),
                   left=float(cols[:band_cols].mean()), right=float(cols[-band_cols:].mean()))


def read_spec(mask: np.ndarray) -> str:
    """The spec's reading: triangle, square, or else circle."""
    f = ShapeFeatures.of(mask)
    if f.bottom - f.top > SPEC_TRIANGLE_MIN_WIDENING:
        return "triangle"
    if f.fill >= SPEC_SQUARE_MIN_FILL:
        return "square"
    return "circle"


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def read_strict(mask: np.ndarray) -> str:
    """circle, square or triangle when the region looks like that shape, else UNCLEAR."""
    f = ShapeFeatures.of(mask)
    if f.aspect < STRICT_MIN_ASPECT:
        return UNCLEAR
    bands = (f.top, f.bottom, f.left, f.right)
    if f.fill >= SQUARE_MIN_FILL and min(bands) >= SQUARE_MIN_BAND:
        return "square"
    if (_within(f.fill, CIRCLE_FILL) and all(_within(b, CIRCLE_BAND) for b in bands)
            and abs(f.top - f.bottom) <= CIRCLE_MAX_BAND_DIFFERENCE
            and abs(f.left - f.right) <= CIRCLE_MAX_BAND_DIFFERENCE):
        return "circle"
    if (_within(f.fill, TRIANGLE_FILL) and f.top <= TRIANGLE_MAX_TOP and f.bottom >= TRIANGLE_MIN_BOTTOM
            and max(f.left, f.right) <= TRIANGLE_MAX_SIDE and abs(f.left - f.right) <= TRIANGLE_MAX_SIDE_DIFFERENCE):
        return "triangle"
    return UNCLEAR
