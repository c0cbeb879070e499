"""Tests for the captioned_folder TFDS builder: a messy folder builds, bad items are skipped, counted and logged."""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import ExifTags, Image

from dalle_jax.data import captioned_folder as cf

SIZE = 16
FRACTION = 0.3
GOOD = [f"good/{i:02d}.png" for i in range(12)]
LONG_CAPTION = "word " * 2000  # 10,000 characters


def _colour(i):
    return (20 * i, 255 - 20 * i, 7 * i)


def _write_messy_folder(folder):
    """A folder with good images and one of every kind of bad line and file; returns captions.jsonl lines."""
    (folder / "good").mkdir(parents=True)
    lines = []
    for i, file in enumerate(GOOD):
        Image.new("RGB", (24, 18), _colour(i)).save(folder / file)
        lines.append(json.dumps({"file": file, "caption": f"colour {i}"}))
    converted = {
        "gray.png": Image.new("L", (20, 20), 90),
        "rgba.png": Image.new("RGBA", (20, 20), (255, 0, 0, 0)),
        "cmyk.tif": Image.new("CMYK", (20, 20), (0, 255, 255, 0)),
        "sixteen.png": Image.fromarray(np.full((20, 20), 65535, np.uint16)),
        "dot.png": Image.new("RGB", (1, 1), (1, 2, 3)),
    }
    for name, image in converted.items():
        image.save(folder / name)
        lines.append(json.dumps({"file": name, "caption": f"a {name}"}))
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 255] * 256)
    palette.save(folder / "palette.png", transparency=0)
    lines.append(json.dumps({"file": "palette.png", "caption": "a palette.png"}))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.new("RGB", (30, 20), (0, 200, 0)).save(folder / "rotated.jpg", exif=exif)
    lines.append(json.dumps({"file": "rotated.jpg", "caption": "turned"}))

    (folder / "empty.jpg").write_bytes(b"")
    (folder / "junk.png").write_text("not an image")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "whole.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:-500])
    os.remove(folder / "whole.jpg")
    Image.new("RGB", (8, 8)).save(folder / "uncaptioned.png")
    for name in ("empty.jpg", "junk.png", "truncated.jpg", "missing.png"):
        lines.append(json.dumps({"file": name, "caption": f"bad {name}"}))
    lines += [
        json.dumps({"file": GOOD[0], "caption": "   "}),  # empty caption: this line only is skipped
        json.dumps({"file": GOOD[1], "caption": LONG_CAPTION}),
        json.dumps({"file": "../outside.png", "caption": "escapes the folder"}),
        json.dumps({"file": 3, "caption": "file is not a path"}),
        "{not json",
        "",
    ]
    data = "\n".join(lines).encode("utf-8") + b"\n" + b'{"file": "good/00.png", "caption": "caf\xe9"}\n'
    (folder / cf.CAPTIONS_FILE).write_bytes(data)


EXPECTED_COUNTS = {
    "skipped/empty_caption": 1,
    "skipped/file_outside_folder": 1,
    "skipped/image_without_caption": 1,
    "skipped/invalid_json": 1,
    "skipped/invalid_record": 1,
    "skipped/missing_file": 1,
    "skipped/non_utf8_line": 1,
    "skipped/not_an_image": 1,
    "skipped/truncated_image": 1,
    "skipped/zero_byte_file": 1,
    "normalised/alpha_composited": 2,
    "normalised/caption_truncated": 1,
    "normalised/cmyk_converted": 1,
    "normalised/exif_rotated": 1,
    "normalised/grayscale": 2,
    "normalised/high_bit_depth_scaled": 1,
    "normalised/palette_converted": 1,
    "normalised/upscaled": 1,
}
KEPT_FILES = set(GOOD) | {"gray.png", "rgba.png", "cmyk.tif", "sixteen.png", "dot.png", "palette.png", "rotated.jpg"}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioned_folder")
    folder = root / "pictures"
    _write_messy_folder(folder)
    handler = _Records()
    logger = logging.getLogger(cf.__name__)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        config = cf.CaptionedFolderConfig(folder=folder, image_size=SIZE, validation_fraction=FRACTION)
        builder = cf.CaptionedFolder(config=config, data_dir=root / "tfds")
        builder.download_and_prepare(file_format="array_record")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return builder, handler.records, folder


def _examples(builder):
    examples = {}
    for split in builder.info.splits:
        for example in builder.as_data_source(split):
            key = (example["file"].decode(), example["caption"].decode())
            examples[key] = (split, example["image"])
    return examples


def test_counts_are_written_beside_the_data_and_readable(built):
    builder, _, folder = built
    assert os.path.isfile(os.path.join(builder.data_dir, cf.BAD_EXAMPLES_FILE))
    counts = cf.read_bad_examples(builder.data_dir)
    expected = dict(EXPECTED_COUNTS)
    expected["skipped/total"] = sum(v for k, v in expected.items() if k.startswith("skipped/"))
    num_examples = len(KEPT_FILES) + 1  # good/01.png also has its long caption
    assert counts.pop("examples/train") + counts.pop("examples/validation") == num_examples
    assert counts == expected
    report = json.loads((builder.data_path / cf.BAD_EXAMPLES_FILE).read_text())
    assert report["folder"] == str(folder)


def test_every_bad_item_is_logged_once_with_its_name(built):
    _, records, _ = built
    messages = [r.getMessage() for r in records]
    skipped = ["empty.jpg", "junk.png", "truncated.jpg", "missing.png", "uncaptioned.png", "../outside.png"]
    for name in skipped:
        hits = [r for r in records if name in r.getMessage()]
        assert len(hits) == 1 and hits[0].levelno == logging.WARNING, (name, messages)
    for name in ["gray.png", "rgba.png", "cmyk.tif", "palette.png", "dot.png", "rotated.jpg"]:
        fixes = [m for m in messages if name in m and "normalised" in m]
        assert fixes and len(fixes) == len(set(fixes)), (name, messages)
    lines = {cf.NON_UTF8_LINE, cf.INVALID_JSON, cf.INVALID_RECORD, cf.EMPTY_CAPTION}
    for reason in lines:
        assert len([m for m in messages if f"({reason})" in m and "line" in m]) == 1, (reason, messages)


def test_round_trip_through_as_data_source(built):
    builder, _, _ = built
    examples = _examples(builder)
    assert {file for file, _ in examples} == KEPT_FILES
    for split, image in examples.values():
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    for i, file in enumerate(GOOD):
        if i != 1:
            _, image = examples[(file, f"colour {i}")]
            np.testing.assert_array_equal(image, np.broadcast_to(np.array(_colour(i), np.uint8), image.shape))
    truncated = [caption for file, caption in examples if file == GOOD[1] and caption != "colour 1"]
    assert truncated == [LONG_CAPTION.strip()[:1000]]
    assert (GOOD[0], "   ") not in examples and (GOOD[0], "") not in examples
    for file, colour in [("rgba.png", (255, 255, 255)), ("cmyk.tif", (255, 0, 0)), ("sixteen.png", (255, 255, 255)),
                         ("gray.png", (90, 90, 90)), ("dot.png", (1, 2, 3)), ("palette.png", (255, 255, 255))]:
        _, image = examples[(file, f"a {file}")]
        np.testing.assert_array_equal(image, np.broadcast_to(np.array(colour, np.uint8), image.shape))


def test_splits_follow_the_file_hash(built):
    builder, _, _ = built
    splits = {split for split, _ in _examples(builder).values()}
    assert splits == {cf.TRAIN, cf.VALIDATION}, "pick file names that land in both splits"
    for (file, _), (split, _) in _examples(builder).items():
        assert split == cf.split_of(file, FRACTION)


def test_adding_images_never_moves_old_ones(built, tmp_path):
    builder, _, folder = built
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    lines = []
    for i in range(20):
        Image.new("RGB", (10, 10), (i, i, i)).save(grown / f"new{i}.png")
        lines.append(json.dumps({"file": f"new{i}.png", "caption": f"new {i}"}))
    with open(grown / cf.CAPTIONS_FILE, "a") as f:
        f.write("\n".join(lines) + "\n")
    config = cf.CaptionedFolderConfig(folder=grown, image_size=SIZE, validation_fraction=FRACTION)
    regrown = cf.CaptionedFolder(config=config, data_dir=tmp_path / "tfds")
    regrown.download_and_prepare(file_format="array_record")
    before, after = _examples(builder), _examples(regrown)
    assert len(after) == len(before) + 20
    for key, (split, _) in before.items():
        assert after[key][0] == split


def test_split_of_is_stable_and_near_the_fraction():
    # Pinned: a changed hash would move files between splits of datasets users already prepared.
    assert "".join(cf.split_of(f"img{i}.jpg", 0.5)[0] for i in range(12)) == "vtvvttttvvvv"
    names = [f"photos/{i}.jpg" for i in range(4000)]
    share = sum(cf.split_of(n, 0.2) == cf.VALIDATION for n in names) / len(names)
    assert 0.18 < share < 0.22
    assert all(cf.split_of(n, 0.0) == cf.TRAIN for n in names)


def test_config_name_depends_on_size_and_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = cf.CaptionedFolderConfig(folder="pics", image_size=64)
    absolute = cf.CaptionedFolderConfig(folder=tmp_path / "pics", image_size=64)
    assert relative.name == absolute.name and relative.name.startswith("64px_")
    assert relative.folder == str(tmp_path / "pics")
    assert cf.CaptionedFolderConfig(folder="other", image_size=64).name != relative.name
    assert cf.CaptionedFolderConfig(folder="pics", image_size=32).name.startswith("32px_")
    builder = cf.CaptionedFolder(config=relative, data_dir=tmp_path / "tfds")
    assert relative.name in builder.data_dir


@pytest.mark.parametrize("kwargs,field", [
    ({"folder": "", "image_size": 64}, "folder"),
    ({"folder": "pics", "image_size": 0}, "image_size"),
    ({"folder": "pics", "image_size": 64, "validation_fraction": 1.0}, "validation_fraction"),
    ({"folder": "pics", "image_size": 64, "max_caption_chars": 0}, "max_caption_chars"),
])
def test_bad_config_values_fail_loudly(kwargs, field):
    with pytest.raises(ValueError, match=field):
        cf.CaptionedFolderConfig(**kwargs)


def test_builder_without_folder_config_fails_loudly(tmp_path):
    with pytest.raises(ValueError, match="CaptionedFolderConfig"):
        cf.CaptionedFolder(data_dir=tmp_path)


def test_missing_folder_or_captions_file_names_the_folder_and_the_fix(tmp_path):
    missing = tmp_path / "absent"
    builder = cf.CaptionedFolder(config=cf.CaptionedFolderConfig(folder=missing, image_size=8), data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*captions.jsonl"):
        builder.download_and_prepare(file_format="array_record")
    bare = tmp_path / "bare"
    bare.mkdir()
    builder = cf.CaptionedFolder(config=cf.CaptionedFolderConfig(folder=bare, image_size=8), data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{bare} has no captions.jsonl.*a JSON object per line"):
        builder.download_and_prepare(file_format="array_record")
    assert not builder.is_prepared()


def test_folder_without_any_usable_image_fails_with_the_counts(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_text("text")
    (folder / cf.CAPTIONS_FILE).write_text(json.dumps({"file": "a.png", "caption": "a"}) + "\n")
    builder = cf.CaptionedFolder(config=cf.CaptionedFolderConfig(folder=folder, image_size=8), data_dir=tmp_path)
    with pytest.raises(ValueError, match="no usable captioned image.*not_an_image"):
        builder.download_and_prepare(file_format="array_record")


_BUILD_IN_FRESH_PROCESS = textwrap.dedent("""
    import sys
    import tensorflow_datasets as tfds
    import dalle_jax.data.captioned_folder as cf
    config = cf.CaptionedFolderConfig(folder=sys.argv[1], image_size=8)
    builder = tfds.builder("captioned_folder", config=config, data_dir=sys.argv[2])
    builder.download_and_prepare(file_format="array_record")
    print(builder.data_dir)
""")


def test_registered_name_builds_in_a_fresh_process(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    lines = []
    for i in range(3):
        Image.new("RGB", (12, 9), (50 * i, 0, 0)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"shade {i}"}))
    (folder / cf.CAPTIONS_FILE).write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-c", _BUILD_IN_FRESH_PROCESS, str(folder), str(tmp_path / "tfds")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    data_dir = result.stdout.strip().splitlines()[-1]
    config = cf.CaptionedFolderConfig(folder=folder, image_size=8)
    reader = cf.CaptionedFolder(config=config, data_dir=tmp_path / "tfds")
    assert reader.is_prepared() and reader.data_dir == data_dir
    assert cf.read_bad_examples(data_dir) == {"skipped/total": 0, "examples/train": 3}
    captions = sorted(example["caption"].decode() for example in reader.as_data_source("train"))
    assert captions == ["shade 0", "shade 1", "shade 2"]


def test_read_bad_examples_explains_an_unprepared_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_and_prepare"):
        cf.read_bad_examples(tmp_path)
