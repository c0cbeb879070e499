"""Fixed appearance features of a VQGAN's codes, for a DalleBart that composes colour and shape.

A code id alone says nothing of what the code looks like, so a model that has only ever drawn green squares has no
reason to give the codes of a green triangle's edge any weight. Here each code is described by what it shows in
the training images, split into two parts that add up rather than multiply:

- where it is drawn: for each of a 4x4 grid of points in its patch, the share of its occurrences in which the
  pixel there is not background;
- in which colour: the share of its patch's pixels nearest to each palette colour (all zero for background);

then three flags: a code never seen in the images measured, the decoder's start token, and a constant 1.

With `config.model.code_features` set, the decoder embeds its image-token inputs from these rows alone and adds
`(h @ W) @ features^T` to its output logits, so what it learns of a shape's outline and of a colour holds for every
code that shows them. Both are linear in the features, so `dense_equivalent` turns such a model into the plain
DalleBart layout (an embedding table and an output kernel), which is how it is sampled and exported.
"""
from __future__ import annotations

import numpy as np

MASK_SIDE = 4  # the foreground mask is sampled on a MASK_SIDE x MASK_SIDE grid of each code's patch
FLAGS = ("unseen", "start", "constant")


def palette_width(num_colours: int) -> int:
    """Feature width for a palette of `num_colours` colours (background not counted)."""
    return MASK_SIDE * MASK_SIDE + num_colours + len(FLAGS)


def _mask_points(patch: int) -> np.ndarray:
    """Pixel offsets (within a patch) of the mask grid's points: block centres, rounded down."""
    return np.floor((np.arange(MASK_SIDE) + 0.5) * patch / MASK_SIDE).astype(np.int64)


def palette_code_features(images: np.ndarray, codes: np.ndarray, vocab_size: int, palette: np.ndarray,
                          background) -> np.ndarray:
    """(N, S, S, 3) uint8 images and their (N, g, g) code grids -> (vocab_size + 1, palette_width) float32 rows:
    one per code, then the start token's. Every pixel is assigned to its nearest palette colour or background."""
    images, codes = np.asarray(images), np.asarray(codes)
    palette = np.asarray(palette, np.float32).reshape(-1, 3)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (N, S, S, 3), got shape {images.shape}.")
    n, size = images.shape[:2]
    if codes.ndim != 3 or codes.shape[0] != n or codes.shape[1] != codes.shape[2] or size % codes.shape[1]:
        raise ValueError(f"codes must be (N, g, g) with g dividing the image side {size}, got shape {codes.shape} "
                         f"for images of shape {images.shape}.")
    if codes.min() < 0 or codes.max() >= vocab_size:
        raise ValueError(f"codes hold ids outside [0, {vocab_size}); pass the codes of a VQGAN with "
                         f"{vocab_size} codes.")
    grid = codes.shape[1]
    patch = size // grid
    colours = np.concatenate([palette, np.asarray(background, np.float32).reshape(1, 3)])
    nearest = np.argmin(((images[..., None, :].astype(np.float32) - colours) ** 2).sum(-1), -1)  # (N, S, S)
    points = _mask_points(patch)
    # (N, g, g, MASK_SIDE, MASK_SIDE) labels at each patch's mask points
    rows = (np.arange(grid)[:, None] * patch + points[None, :]).reshape(-1)
    sampled = nearest[:, rows][:, :, rows].reshape(n, grid, MASK_SIDE, grid, MASK_SIDE).transpose(0, 1, 3, 2, 4)
    foreground = (sampled < len(palette)).reshape(n * grid * grid, -1).astype(np.float64)
    # Colour shares over every pixel of the patch, not only the mask points.
    labels = nearest.reshape(n, grid, patch, grid, patch).transpose(0, 1, 3, 2, 4).reshape(n * grid * grid, -1)
    per_colour = np.stack([(labels == k).sum(1) for k in range(len(palette))], 1).astype(np.float64)

    flat = codes.reshape(-1)
    counts = np.bincount(flat, minlength=vocab_size).astype(np.float64)
    mask_sum = np.zeros((vocab_size, foreground.shape[1]))
    colour_sum = np.zeros((vocab_size, len(palette)))
    np.add.at(mask_sum, flat, foreground)
    np.add.at(colour_sum, flat, per_colour)
    seen = counts > 0
    mask = mask_sum / np.maximum(counts, 1)[:, None]
    colour = colour_sum / (np.maximum(counts, 1)[:, None] * patch * patch)

    features = np.zeros((vocab_size + 1, palette_width(len(palette))), np.float32)
    features[:vocab_size, :mask.shape[1]] = mask
    features[:vocab_size, mask.shape[1]:mask.shape[1] + len(palette)] = colour
    flags = mask.shape[1] + len(palette)
    features[:vocab_size, flags] = ~seen
    features[vocab_size, flags + 1] = 1.0
    features[:, flags + 2] = 1.0
    return features
