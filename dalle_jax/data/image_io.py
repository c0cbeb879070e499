"""Robust reading of user images into square uint8 RGB arrays.

Image folders collected by people contain every kind of file: grayscale scans, transparent PNGs,
CMYK JPEGs from print workflows, 16-bit TIFFs, phone photos that rely on an EXIF Orientation tag,
thumbnails, 100-megapixel panoramas, and files that are empty, truncated or not images at all.
`load_image` turns any of them into an (S, S, 3) uint8 array (RGB, centre-cropped to a square, resized)
or says why it could not, and lists every normalisation it applied, so a dataset builder can skip, count
and log instead of crashing.

Pixel policy: images up to `MAX_IMAGE_PIXELS` are decoded (PIL's own decompression bomb guard is raised
to match at import, never lowered); larger ones are skipped as `too_many_pixels`. JPEGs are decoded at a
reduced DCT scale (`Image.draft`) and other formats are box-reduced (`Image.reduce`) before any mode
conversion, so memory peaks at about one decoded copy of the source.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Largest image decoded (about 200 MP: a 14000 x 14000 panorama, ~800 MB while decoding).
MAX_IMAGE_PIXELS = 200_000_000
# Images above this are reported as `very_large_image` (they are still used).
LARGE_IMAGE_PIXELS = 8192 * 8192
# Cheap pre-shrinking stops once the image is this many times the output side, leaving the rest to
# the resampling filter, so quality matches a full-resolution filter.
REDUCING_GAP = 2.0
WHITE = (255, 255, 255)

# Reasons an image is skipped (the `problem` of a load).
MISSING_FILE = "missing_file"
ZERO_BYTE_FILE = "zero_byte_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED_IMAGE = "truncated_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"

# Normalisations applied to an image that is kept (the `fixes` of a load).
EXIF_ROTATED = "exif_rotated"
EXIF_UNREADABLE = "exif_unreadable"
GRAYSCALE = "grayscale"
ALPHA_COMPOSITED = "alpha_composited"
CMYK_CONVERTED = "cmyk_converted"
HIGH_BIT_DEPTH_SCALED = "high_bit_depth_scaled"
PALETTE_CONVERTED = "palette_converted"
OTHER_MODE_CONVERTED = "other_mode_converted"
UPSCALED = "upscaled"
VERY_LARGE_IMAGE = "very_large_image"

RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La")

if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """The outcome of loading one file."""

    pixels: np.ndarray | None  # (size, size, 3) uint8, None when the file is skipped
    problem: str | None  # why the file is skipped, None when it is usable
    fixes: tuple[str, ...] = ()  # normalisations applied, in order
    detail: str = ""  # the underlying error message, for logs


def load_rgb_square(
        path: str | os.PathLike, size: int, resample: str = "lanczos"
) -> tuple[np.ndarray | None, str | None]:
    """Returns `(pixels, None)` with pixels (size, size, 3) uint8, or `(None, problem)`."""
    loaded = load_image(path, size, resample=resample)
    return loaded.pixels, loaded.problem


def load_image(
        path: str | os.PathLike,
        size: int,
        *,
        resample: str = "lanczos",
        max_pixels: int = MAX_IMAGE_PIXELS,
) -> LoadedImage:
    """Reads any image file as an RGB square of side `size`; never raises on bad file content."""
    _check_arguments(size, resample, max_pixels)
    path = os.fspath(path)
    if not os.path.isfile(path):
        return LoadedImage(None, MISSING_FILE, detail=f"{path} is not a file")
    if os.path.getsize(path) == 0:
        return LoadedImage(None, ZERO_BYTE_FILE)
    try:
        # The size check below replaces PIL's warning; its hard limit still applies above 2x its setting.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError as e:
        return LoadedImage(None, NOT_AN_IMAGE, detail=str(e))
    except Image.DecompressionBombError as e:
        return LoadedImage(None, TOO_MANY_PIXELS, detail=str(e))
    except Exception as e:  # Plugins raise many types on malformed headers; none may stop a build.
        return LoadedImage(None, _decode_problem(e), detail=f"{type(e).__name__}: {e}")
    with image:
        width, height = image.size
        if width * height > max_pixels:
            return LoadedImage(None, TOO_MANY_PIXELS, detail=f"{width}x{height} exceeds max_pixels={max_pixels}")
        try:
            pixels, fixes = _to_rgb_square(image, size, RESAMPLING[resample])
        except Exception as e:  # Decoders fail mid-stream in many ways on damaged files.
            return LoadedImage(None, _decode_problem(e), detail=f"{type(e).__name__}: {e}")
    return LoadedImage(pixels, None, tuple(dict.fromkeys(fixes)))


def centre_square_box(width: int, height: int, multiple: int = 1) -> tuple[int, int, int, int]:
    """The largest centred square inside a width x height image whose side divides by `multiple`."""
    side = min(width, height) // multiple * multiple
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def to_eight_bit(values: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Maps high-bit-depth samples to uint8.

    Samples known to be 16-bit are scaled by 255/65535 (65535 -> 255, 257*k -> k). For 32-bit integer
    or float samples the depth is not recorded in the file, so it is judged from the values: floats in
    [0, 1] are treated as normalised, values in [0, 255] as already 8-bit, anything larger as 16-bit.
    """
    is_float = np.issubdtype(values.dtype, np.floating)
    values = values.astype(np.float32)
    peak = float(values.max()) if values.size else 0.0
    if sixteen_bit or peak > 255.0:
        values = np.clip(values, 0.0, 65535.0) * (255.0 / 65535.0)
    elif is_float and peak <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _check_arguments(size: int, resample: str, max_pixels: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} must be a positive int (the output side in pixels).")
    if resample not in RESAMPLING:
        raise ValueError(f"resample={resample!r} is not one of {sorted(RESAMPLING)}.")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels={max_pixels!r} must be a positive int.")


def _decode_problem(error: Exception) -> str:
    return TRUNCATED_IMAGE if "truncated" in str(error).lower() else CORRUPT_IMAGE


def _to_rgb_square(
        image: Image.Image, size: int, resample: Image.Resampling
) -> tuple[np.ndarray, list[str]]:
    fixes = []
    width, height = image.size
    if width * height > LARGE_IMAGE_PIXELS:
        fixes.append(VERY_LARGE_IMAGE)
    if min(width, height) < size:
        fixes.append(UPSCALED)
    if image.format in ("JPEG", "MPO"):
        # Decode at 1/2, 1/4 or 1/8 scale while the short side stays >= REDUCING_GAP * size.
        scale = REDUCING_GAP * size / min(width, height)
        image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    image.load()  # before reading EXIF: PNG's getexif() decodes too, and its errors must not pass as EXIF's
    orientation = _exif_orientation(image, fixes)
    if orientation in range(2, 9):  # 1 is upright; other values are not orientations
        ImageOps.exif_transpose(image, in_place=True)
        fixes.append(EXIF_ROTATED)
    image = _make_reducible(image, fixes)
    factor = int(min(image.size) // (REDUCING_GAP * size))
    if factor >= 2:
        image = image.reduce(factor, box=centre_square_box(*image.size, multiple=factor))
        box = (0, 0) + image.size
    else:
        box = centre_square_box(*image.size)
    image = _make_rgb(image, fixes)
    if box[2] - box[0] == size and box[3] - box[1] == size:
        image = image.crop(box)
    else:
        image = image.resize((size, size), resample=resample, box=box)
    return np.asarray(image, dtype=np.uint8), fixes


def _exif_orientation(image: Image.Image, fixes: list[str]) -> int | None:
    try:
        return image.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # A broken EXIF block should not cost the picture; it is shown as stored.
        fixes.append(EXIF_UNREADABLE)
        return None


def _make_reducible(image: Image.Image, fixes: list[str]) -> Image.Image:
    """Converts the modes `Image.reduce` cannot handle (1, 16-bit) or would average wrongly (palette indices)."""
    if image.mode == "1":
        fixes.append(GRAYSCALE)
        return image.convert("L")
    if image.mode in ("P", "PA"):
        fixes.append(PALETTE_CONVERTED)
        if image.mode == "PA" or "transparency" in image.info or \
                (image.palette is not None and image.palette.mode == "RGBA"):
            return image.convert("RGBA")
        return image.convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES:
        fixes.append(GRAYSCALE)
        fixes.append(HIGH_BIT_DEPTH_SCALED)
        return Image.fromarray(to_eight_bit(np.asarray(image), sixteen_bit=True))
    return image


def _make_rgb(image: Image.Image, fixes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "L":
        fixes.append(GRAYSCALE)
        return image.convert("RGB")
    if mode in _ALPHA_MODES:
        if mode.startswith("L"):
            fixes.append(GRAYSCALE)
        fixes.append(ALPHA_COMPOSITED)
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba)  # an RGBA mask blends by its alpha channel
        return background
    if mode == "CMYK":
        fixes.append(CMYK_CONVERTED)
        return image.convert("RGB")
    if mode in ("I", "F"):
        fixes.append(GRAYSCALE)
        fixes.append(HIGH_BIT_DEPTH_SCALED)
        return Image.fromarray(to_eight_bit(np.asarray(image), sixteen_bit=False)).convert("RGB")
    fixes.append(OTHER_MODE_CONVERTED)
    return image.convert("RGB")
