"""Tests for dalle_jax.data.image_io: every kind of messy image file becomes an RGB square or a named skip."""
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import ExifTags, Image

from dalle_jax.data import image_io

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def _bands(width, height, colours, mode="RGB", vertical=True):
    """An image split into equal bands of the given colours, left to right (or top to bottom)."""
    image = Image.new(mode, (width, height))
    n = len(colours)
    for i, colour in enumerate(colours):
        box = (i * width // n, 0, (i + 1) * width // n, height) if vertical else \
            (0, i * height // n, width, (i + 1) * height // n)
        image.paste(colour, box)
    return image


@pytest.mark.parametrize("width,height", [(37, 23), (23, 37), (64, 64), (300, 120)])
def test_output_is_square_uint8_rgb(tmp_path, width, height):
    path = _save(tmp_path / "a.png", Image.new("RGB", (width, height), (10, 20, 30)))
    pixels, problem = image_io.load_rgb_square(path, 16)
    assert problem is None
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.broadcast_to(np.array([10, 20, 30], np.uint8), (16, 16, 3)))


def test_wide_image_keeps_its_centre_square(tmp_path):
    # 40x20: left quarter red, middle half green, right quarter blue -> the centre 20x20 is all green.
    path = _save(tmp_path / "wide.png", _bands(40, 20, [RED, GREEN, GREEN, BLUE]))
    pixels, _ = image_io.load_rgb_square(path, 20)
    np.testing.assert_array_equal(pixels, np.broadcast_to(np.array(GREEN, np.uint8), (20, 20, 3)))


@pytest.mark.parametrize("vertical", [True, False])
def test_centre_crop_of_image_with_distinct_halves(tmp_path, vertical):
    # Red half then blue half, along the long side: the centre square is half red, half blue, in order.
    size = (40, 20) if vertical else (20, 40)
    path = _save(tmp_path / "halves.png", _bands(*size, [RED, BLUE], vertical=vertical))
    pixels, _ = image_io.load_rgb_square(path, 20)
    first, second = (pixels[:, :10], pixels[:, 10:]) if vertical else (pixels[:10], pixels[10:])
    np.testing.assert_array_equal(first, np.broadcast_to(np.array(RED, np.uint8), first.shape))
    np.testing.assert_array_equal(second, np.broadcast_to(np.array(BLUE, np.uint8), second.shape))


def test_centre_square_box_with_multiple():
    assert image_io.centre_square_box(40, 20) == (10, 0, 30, 20)
    assert image_io.centre_square_box(21, 40) == (0, 9, 21, 30)
    assert image_io.centre_square_box(41, 23, multiple=4) == (10, 1, 30, 21)


@pytest.mark.parametrize("orientation,left,right", [(6, BLUE, RED), (8, RED, BLUE)])
def test_exif_orientation_is_applied(tmp_path, orientation, left, right):
    # Stored 40x20 with a red top half and blue bottom half. Orientation 6 is shown turned 90 degrees
    # clockwise (red on the right), 8 counter-clockwise (red on the left); stored as-is the centre square
    # would be red above blue.
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = _save(tmp_path / "photo.jpg", _bands(40, 20, [RED, BLUE], vertical=False),
                 exif=exif, quality=95, subsampling=0)
    loaded = image_io.load_image(path, 20)
    assert loaded.problem is None
    assert image_io.EXIF_ROTATED in loaded.fixes
    pixels = loaded.pixels.astype(int)
    # JPEG blurs the seam a little; compare column means away from it.
    np.testing.assert_allclose(pixels[:, :7].mean(axis=(0, 1)), left, atol=12)
    np.testing.assert_allclose(pixels[:, 13:].mean(axis=(0, 1)), right, atol=12)


def test_image_without_orientation_reports_no_rotation(tmp_path):
    path = _save(tmp_path / "plain.jpg", Image.new("RGB", (30, 30), GREEN))
    assert image_io.EXIF_ROTATED not in image_io.load_image(path, 16).fixes


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gradient = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (16, 1))
    path = _save(tmp_path / "gray.png", Image.fromarray(gradient))
    loaded = image_io.load_image(path, 16)
    assert loaded.fixes == (image_io.GRAYSCALE,)
    for channel in range(3):
        np.testing.assert_array_equal(loaded.pixels[..., channel], gradient)


def test_rgba_is_composited_on_white(tmp_path):
    # Bands: transparent red, half-transparent black, opaque blue.
    path = _save(tmp_path / "rgba.png",
                 _bands(30, 30, [(255, 0, 0, 0), (0, 0, 0, 128), (0, 0, 255, 255)], mode="RGBA"))
    loaded = image_io.load_image(path, 30)
    assert image_io.ALPHA_COMPOSITED in loaded.fixes
    pixels = loaded.pixels.astype(int)
    np.testing.assert_array_equal(pixels[:, :10], np.full((30, 10, 3), 255))
    np.testing.assert_allclose(pixels[:, 10:20], np.full((30, 10, 3), 255 * 127 / 255), atol=1)
    np.testing.assert_array_equal(pixels[:, 20:], np.broadcast_to(BLUE, (30, 10, 3)))


def test_palette_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (20, 20), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.paste(1, (10, 0, 20, 20))  # right half: palette index 1 (blue); left half index 0 (red)
    path = _save(tmp_path / "palette.png", image, transparency=0)
    loaded = image_io.load_image(path, 20)
    assert loaded.fixes == (image_io.PALETTE_CONVERTED, image_io.ALPHA_COMPOSITED)
    np.testing.assert_array_equal(loaded.pixels[:, :10], np.full((20, 10, 3), 255, np.uint8))
    np.testing.assert_array_equal(loaded.pixels[:, 10:], np.broadcast_to(np.array(BLUE, np.uint8), (20, 10, 3)))


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([12, 34, 56] + [0] * (256 * 3 - 3))
    loaded = image_io.load_image(_save(tmp_path / "p.png", image), 8)
    assert loaded.fixes == (image_io.PALETTE_CONVERTED,)
    np.testing.assert_array_equal(loaded.pixels, np.broadcast_to(np.array([12, 34, 56], np.uint8), (8, 8, 3)))


def test_palette_with_alpha_channel_is_shrunk_by_colour_not_by_index(tmp_path):
    # Columns alternate palette index 0 (red) and 2 (blue); shrinking must blend the colours (purple), where
    # averaging the indices would give index 1 (green).
    image = Image.new("PA", (40, 40), (0, 255))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    for x in range(1, 40, 2):
        image.paste((2, 255), (x, 0, x + 1, 40))
    loaded = image_io.load_image(_save(tmp_path / "pa.tif", image), 10)
    assert image_io.PALETTE_CONVERTED in loaded.fixes
    np.testing.assert_allclose(loaded.pixels.reshape(-1, 3).mean(axis=0), (127.5, 0, 127.5), atol=2)


def test_cmyk_is_converted(tmp_path):
    path = _save(tmp_path / "cmyk.tif", Image.new("CMYK", (12, 12), (0, 255, 255, 0)))
    loaded = image_io.load_image(path, 12)
    assert loaded.fixes == (image_io.CMYK_CONVERTED,)
    np.testing.assert_array_equal(loaded.pixels, np.broadcast_to(np.array(RED, np.uint8), (12, 12, 3)))


SIXTEEN_BIT_BANDS = np.repeat(np.array([[0, 128 * 257, 65535]]), 4, axis=1).repeat(12, axis=0)  # 12x12


@pytest.mark.parametrize("name,image", [
    ("i16.png", Image.fromarray(SIXTEEN_BIT_BANDS.astype(np.uint16))),  # opens as "I;16"
    ("i32.tif", Image.fromarray(SIXTEEN_BIT_BANDS.astype(np.int32))),  # opens as "I"
])
def test_sixteen_bit_samples_are_scaled_not_clipped(tmp_path, name, image):
    path = _save(tmp_path / name, image)
    loaded = image_io.load_image(path, 12)
    assert image_io.HIGH_BIT_DEPTH_SCALED in loaded.fixes
    expected = np.repeat(np.array([[0, 128, 255]], np.uint8), 4, axis=1).repeat(12, axis=0)
    for channel in range(3):
        np.testing.assert_array_equal(loaded.pixels[..., channel], expected)


def test_to_eight_bit_judges_depth_of_untagged_samples():
    np.testing.assert_array_equal(image_io.to_eight_bit(np.array([0, 100, 255]), sixteen_bit=False), [0, 100, 255])
    np.testing.assert_array_equal(image_io.to_eight_bit(np.array([0, 257, 65535, 70000]), sixteen_bit=False),
                                  [0, 1, 255, 255])
    np.testing.assert_array_equal(image_io.to_eight_bit(np.array([0.0, 0.5, 1.0], np.float32), sixteen_bit=False),
                                  [0, 128, 255])
    np.testing.assert_array_equal(image_io.to_eight_bit(np.array([0, 255], np.uint16), sixteen_bit=True), [0, 1])


def test_one_pixel_image_is_upscaled(tmp_path):
    path = _save(tmp_path / "dot.png", Image.new("RGB", (1, 1), (200, 100, 50)))
    loaded = image_io.load_image(path, 16)
    assert loaded.fixes == (image_io.UPSCALED,)
    np.testing.assert_array_equal(loaded.pixels, np.broadcast_to(np.array([200, 100, 50], np.uint8), (16, 16, 3)))


def _truncated(fmt):
    def write(path):
        buffer = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, fmt)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return write


def _broken_png_data(path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), GREEN).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.find(b"IDAT") + 4
    data[start:start + 40] = bytes(range(40))  # not a zlib stream
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,write,problem", [
    ("empty.jpg", lambda p: p.write_bytes(b""), image_io.ZERO_BYTE_FILE),
    ("notes.png", lambda p: p.write_text("this is not an image"), image_io.NOT_AN_IMAGE),
    ("cut.jpg", _truncated("JPEG"), image_io.TRUNCATED_IMAGE),
    ("cut.png", _truncated("PNG"), image_io.TRUNCATED_IMAGE),
    ("broken.png", _broken_png_data, image_io.CORRUPT_IMAGE),
])
def test_bad_files_are_named_not_raised(tmp_path, name, write, problem):
    path = tmp_path / name
    write(path)
    assert image_io.load_rgb_square(path, 16) == (None, problem)


def test_missing_file(tmp_path):
    assert image_io.load_rgb_square(tmp_path / "nope.png", 16) == (None, image_io.MISSING_FILE)


def test_pixel_limit_skips_before_decoding(tmp_path):
    path = _save(tmp_path / "a.png", Image.new("RGB", (100, 100)))
    loaded = image_io.load_image(path, 16, max_pixels=5000)
    assert loaded.problem == image_io.TOO_MANY_PIXELS and "100x100" in loaded.detail


@pytest.mark.parametrize("kwargs,field", [({"size": 0}, "size"), ({"size": 16, "resample": "box"}, "resample"),
                                          ({"size": 16, "max_pixels": 0}, "max_pixels")])
def test_bad_arguments_fail_loudly(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        image_io.load_image(tmp_path / "a.png", **kwargs)


def test_bicubic_resampling_is_available(tmp_path):
    path = _save(tmp_path / "a.png", Image.new("RGB", (40, 40), (9, 99, 199)))
    pixels, problem = image_io.load_rgb_square(path, 16, resample="bicubic")
    assert problem is None and pixels.shape == (16, 16, 3)


# Loaded by file path in a fresh interpreter, so the peak memory seen is this one load (not jax or TFDS).
_LOAD_LARGE = textwrap.dedent("""
    import importlib.util, json, sys, warnings
    spec = importlib.util.spec_from_file_location("image_io", sys.argv[1])
    image_io = importlib.util.module_from_spec(spec)
    sys.modules["image_io"] = image_io
    spec.loader.exec_module(image_io)

    def mib(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024

    warnings.simplefilter("error")  # a decompression bomb warning would fail the load
    before = mib("VmRSS")
    loaded = image_io.load_image(sys.argv[2], 64)
    print(json.dumps({"extra_mib": mib("VmHWM") - before, "problem": loaded.problem, "fixes": loaded.fixes,
                      "colours": sorted({tuple(map(int, c)) for c in loaded.pixels.reshape(-1, 3)})}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak memory from /proc")
def test_very_large_png_is_read_within_memory_and_without_bomb_guard(tmp_path):
    # 100 MP is above PIL's default warning threshold (89 MP). PIL holds RGB at 4 bytes a pixel, so one
    # decoded copy is 400 MB; a full-size mode conversion or float copy would add 300 MB or more.
    path = _save(tmp_path / "huge.png", Image.new("RGB", (10000, 10000), (12, 200, 34)), compress_level=1)
    result = subprocess.run([sys.executable, "-c", _LOAD_LARGE, image_io.__file__, str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["problem"] is None
    assert report["fixes"] == [image_io.VERY_LARGE_IMAGE]
    assert report["colours"] == [[12, 200, 34]]
    assert report["extra_mib"] < 600, report


def test_pixel_policy_raises_pil_guard_to_match():
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= image_io.MAX_IMAGE_PIXELS
