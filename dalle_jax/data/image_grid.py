"""Pictures made of several images."""
from __future__ import annotations

import numpy as np


def image_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """Tiles uint8 (N, H, W, 3) images into one picture, `columns` wide, on a white background."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return grid
