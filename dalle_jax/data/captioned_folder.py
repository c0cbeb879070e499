"""TFDS builder `captioned_folder`: a user's folder of images plus `captions.jsonl` as a dataset.

The folder holds images (any layout of sub-folders) and `captions.jsonl`, one JSON object a line:
`{"file": "relative/path.jpg", "caption": "a red cube on a table"}`. A file may have several caption lines.

    builder = CaptionedFolder(config=CaptionedFolderConfig(folder="~/pics", image_size=256), data_dir=...)
    builder.download_and_prepare(file_format="array_record")
    train = builder.as_data_source("train")
    read_bad_examples(builder.data_dir)  # {"skipped/truncated_image": 3, "normalised/grayscale": 12, ...}

Every image becomes an (S, S, 3) uint8 PNG (RGB, centre square, Lanczos-resized) by `image_io.load_image`.
Bad data never stops the build: each bad line or file is skipped or normalised, logged once with its name
and counted in `bad_examples.json` beside the prepared data.

The folder is checked in full before TFDS writes anything (`_split_generators`), decoding every image
once, so the counts are exact and no split can end up empty; writing then decodes the good images again.
An example goes to `validation` when a hash of its file path falls below `validation_fraction`, so adding
images never moves old ones between splits.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from dalle_jax import storage
from dalle_jax.data import image_io

CAPTIONS_FILE = "captions.jsonl"
BAD_EXAMPLES_FILE = "bad_examples.json"
TRAIN = "train"
VALIDATION = "validation"

# Reasons a caption line or an image is skipped, besides image_io's reasons for an image.
NON_UTF8_LINE = "non_utf8_line"
INVALID_JSON = "invalid_json"
INVALID_RECORD = "invalid_record"
EMPTY_CAPTION = "empty_caption"
FILE_OUTSIDE_FOLDER = "file_outside_folder"
IMAGE_WITHOUT_CAPTION = "image_without_caption"
# A caption longer than `max_caption_chars` is kept, cut to that length.
CAPTION_TRUNCATED = "caption_truncated"

_PROGRESS_EVERY = 1000

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False, kw_only=True)
class CaptionedFolderConfig(tfds.core.BuilderConfig):
    """Which folder to read and how to shape it; the config name is derived, never given."""

    name: str = dataclasses.field(init=False, default="")
    folder: str  # directory or bucket URL (gs://, s3://) holding the images and captions.jsonl
    image_size: int  # side S of the square output images
    validation_fraction: float = 0.02  # share of files (by path hash) in the validation split
    max_caption_chars: int = 1000  # longer captions are cut to this many characters

    def __post_init__(self):
        folder = os.fspath(self.folder) if isinstance(self.folder, (str, os.PathLike)) else None
        if not folder:
            raise ValueError(f"CaptionedFolderConfig.folder={self.folder!r} must be the path of a directory (or a "
                             f"bucket URL) holding your images and {CAPTIONS_FILE}.")
        self.folder = _normalized(folder)
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)) \
                or self.image_size < 1:
            raise ValueError(f"CaptionedFolderConfig.image_size={self.image_size!r} must be a positive int, the "
                             "side of the square images, e.g. 256.")
        self.image_size = int(self.image_size)
        if not isinstance(self.validation_fraction, (int, float)) or not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"CaptionedFolderConfig.validation_fraction={self.validation_fraction!r} must be in "
                             "[0, 1), e.g. 0.02; 0 gives no validation split.")
        if isinstance(self.max_caption_chars, bool) or not isinstance(self.max_caption_chars, int) \
                or self.max_caption_chars < 1:
            raise ValueError(f"CaptionedFolderConfig.max_caption_chars={self.max_caption_chars!r} must be a "
                             "positive int, e.g. 1000.")
        self.name = config_name(self.folder, self.image_size)


def _normalized(folder: str | os.PathLike) -> str:
    """A bucket URL without a trailing slash, or an absolute local path."""
    folder = os.fspath(folder)
    return folder.rstrip("/") if storage.is_remote(folder) else os.path.abspath(os.path.expanduser(folder))


def config_name(folder: str | os.PathLike, image_size: int) -> str:
    """`<S>px_<hash of the absolute folder path or URL>`, so two folders never share a data_dir entry."""
    return f"{int(image_size)}px_{hashlib.sha256(_normalized(folder).encode('utf-8')).hexdigest()[:8]}"


def split_of(file: str, validation_fraction: float) -> str:
    """The split of a file, from a hash of its relative path alone (stable across runs and machines)."""
    digest = hashlib.sha256(file.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return VALIDATION if position < validation_fraction else TRAIN


def read_bad_examples(data_dir: str | os.PathLike) -> dict[str, int]:
    """Counts of a prepared dataset as flat metrics: `skipped/<reason>`, `skipped/total`, `normalised/<fix>`,
    `examples/<split>`. `data_dir` is the builder's `data_dir` (the versioned folder of the prepared data)."""
    path = epath.Path(data_dir) / BAD_EXAMPLES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: prepare the captioned_folder dataset first "
                                "(builder.download_and_prepare()) and pass builder.data_dir.")
    report = json.loads(path.read_text())
    flat = {}
    for group in ("skipped", "normalised", "examples"):
        for key, count in sorted(report[group].items()):
            flat[f"{group}/{key}"] = int(count)
    flat["skipped/total"] = sum(report["skipped"].values())
    return flat


def bad_example_metrics(builder) -> dict[str, int]:
    """`data/skipped/<reason>`, `data/normalised/<fix>`, ... of a prepared captioned_folder dataset, for a
    trainer's metrics; {} for any other dataset."""
    if not isinstance(builder, CaptionedFolder):
        return {}
    return {f"data/{key}": count for key, count in read_bad_examples(builder.data_dir).items()}


@dataclasses.dataclass(frozen=True)
class FolderEntry:
    """One usable (image, caption) pair."""

    file: str  # path relative to the folder, with "/" separators
    caption: str
    line: int  # 1-based line of captions.jsonl


@dataclasses.dataclass
class FolderScan:
    """What a folder holds once checked: usable entries per split and the counts of everything else."""

    folder: str
    splits: dict[str, list[FolderEntry]]
    skipped: collections.Counter
    normalised: collections.Counter

    def report(self, examples: dict[str, int] | None = None) -> dict:
        """The content of bad_examples.json; `examples` defaults to the entry counts of the scan."""
        if examples is None:
            examples = {split: len(entries) for split, entries in self.splits.items()}
        return {
            "folder": self.folder,
            "skipped": dict(sorted(self.skipped.items())),
            "normalised": dict(sorted(self.normalised.items())),
            "examples": dict(sorted(examples.items())),
        }


def readable_folder(folder: str) -> str:
    """`folder` itself, or for a bucket URL this host's copy of it on local scratch (fetched once; only the host that
    prepares the dataset reads the images)."""
    if not storage.is_remote(folder):
        return folder
    if not storage.isdir(folder):
        raise FileNotFoundError(f"CaptionedFolderConfig.folder={storage.shown(folder)} holds no objects. Point it at "
                                f"the bucket prefix holding your images and {CAPTIONS_FILE}.")
    local = storage.staging_dir(folder)
    storage.stage_tree(folder, local, "image folder")
    return local


def scan_folder(config: CaptionedFolderConfig) -> FolderScan:
    """Reads captions.jsonl, checks and decodes every captioned image, and assigns splits."""
    folder = readable_folder(config.folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CaptionedFolderConfig.folder={folder} does not exist or is not a directory. Point "
                                f"it at the directory holding your images and {CAPTIONS_FILE}.")
    captions_path = os.path.join(folder, CAPTIONS_FILE)
    if not os.path.isfile(captions_path):
        raise FileNotFoundError(f"{folder} has no {CAPTIONS_FILE}. Write one there with a JSON object per line: "
                                '{"file": "relative/path.jpg", "caption": "what the image shows"}.')
    skipped, normalised = collections.Counter(), collections.Counter()
    referenced, candidates = _read_captions(folder, captions_path, config.max_caption_chars, skipped, normalised)
    _count_uncaptioned_images(folder, referenced, skipped)

    verdicts = {}
    for i, file in enumerate(sorted({entry.file for entry in candidates})):
        if i and i % _PROGRESS_EVERY == 0:
            log.info("captioned_folder: checked %d images of %s", i, folder)
        loaded = image_io.load_image(os.path.join(folder, file), config.image_size)
        verdicts[file] = loaded.problem
        if loaded.problem:
            _skip(skipped, loaded.problem, f"{file}: {loaded.detail}" if loaded.detail else file)
        for fix in loaded.fixes:
            normalised[fix] += 1
            log.info("captioned_folder: %s normalised (%s)", file, fix)

    splits = collections.defaultdict(list)
    for entry in sorted(candidates, key=lambda e: (e.file, e.line)):
        if verdicts[entry.file] is None:
            splits[split_of(entry.file, config.validation_fraction)].append(entry)
    scan = FolderScan(folder, dict(splits), skipped, normalised)
    if not splits:
        raise ValueError(f"{folder} has no usable captioned image; counts: {scan.report()}. Check that the 'file' "
                         f"fields of {CAPTIONS_FILE} name images relative to the folder.")
    if skipped:
        log.warning("captioned_folder: skipped %d items of %s: %s", sum(skipped.values()), folder, dict(skipped))
    return scan


def _skip(skipped: collections.Counter, reason: str, what: str) -> None:
    skipped[reason] += 1
    log.warning("captioned_folder: skipped %s (%s)", what, reason)


def _read_captions(folder, captions_path, max_chars, skipped, normalised) -> tuple[set[str], list[FolderEntry]]:
    """Returns the files named by any well-formed line, and the entries whose caption and file are usable."""
    referenced, entries = set(), []
    with open(captions_path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{CAPTIONS_FILE} line {number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                _skip(skipped, NON_UTF8_LINE, where)
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                _skip(skipped, INVALID_JSON, where)
                continue
            if not (isinstance(record, dict) and isinstance(record.get("file"), str) and record["file"]
                    and isinstance(record.get("caption"), str)):
                _skip(skipped, INVALID_RECORD, f"{where} (needs string 'file' and 'caption')")
                continue
            file = _relative_file(record["file"])
            if file is None:
                _skip(skipped, FILE_OUTSIDE_FOLDER, f"{where}: {record['file']}")
                continue
            referenced.add(file)
            caption = record["caption"].strip()
            if not caption:
                _skip(skipped, EMPTY_CAPTION, f"{where}: {file}")
                continue
            if len(caption) > max_chars:
                caption = caption[:max_chars]
                normalised[CAPTION_TRUNCATED] += 1
                log.info("captioned_folder: %s: caption of %s cut to %d characters", where, file, max_chars)
            if not os.path.isfile(os.path.join(folder, file)):
                _skip(skipped, image_io.MISSING_FILE, f"{where}: {file}")
                continue
            entries.append(FolderEntry(file, caption, number))
    return referenced, entries


def _relative_file(file: str) -> str | None:
    """The path normalised to `a/b.jpg`, or None when it is absolute or leaves the folder."""
    file = posixpath.normpath(file.replace(os.sep, "/"))
    if posixpath.isabs(file) or file == ".." or file.startswith("../") or file == ".":
        return None
    return file


def _count_uncaptioned_images(folder: str, referenced: set[str], skipped: collections.Counter) -> None:
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                continue
            file = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if file not in referenced:
                _skip(skipped, IMAGE_WITHOUT_CAPTION, file)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array (PIL is much faster here than TFDS's TensorFlow graph per image)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class CaptionedFolder(tfds.core.GeneratorBasedBuilder):
    """Captioned images from a local folder; needs `config=CaptionedFolderConfig(folder=..., image_size=...)`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "RGB centre squares, captions, file paths; bad_examples.json counts."}

    def __init__(self, *, config: CaptionedFolderConfig | None = None, **kwargs):
        if not isinstance(config, CaptionedFolderConfig):
            raise ValueError(
                f"CaptionedFolder got config={config!r}; pass config=CaptionedFolderConfig(folder=DIR, "
                "image_size=S). To read prepared data without the folder, use "
                "tfds.builder_from_directory(<data_dir>/captioned_folder/<config name>/<version>).")
        self._scan = None
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        size = config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=config.description or f"Captioned images of {storage.shown(config.folder)} at {size}x{size}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format="png"),
                "caption": tfds.features.Text(),
                "file": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        self._scan = scan_folder(self.builder_config)
        return {split: self._generate_examples(entries) for split, entries in sorted(self._scan.splits.items())}

    def _generate_examples(self, entries: list[FolderEntry]) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        file, png = None, None
        for entry in entries:  # sorted by file, so the captions of one image share one decode
            if entry.file != file:
                file = entry.file
                pixels, problem = image_io.load_rgb_square(os.path.join(self._scan.folder, file), config.image_size)
                png = None if problem else encode_png(pixels)
                if problem:  # the file changed since the scan
                    _skip(self._scan.skipped, problem, file)
            if png is not None:
                yield f"{entry.file}#{entry.line}", {"image": png, "caption": entry.caption, "file": entry.file}

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        # self.data_dir is still TFDS's temporary folder here; it is renamed into place on success.
        examples = {name: split.num_examples for name, split in self.info.splits.items()}
        path = epath.Path(self.data_dir) / BAD_EXAMPLES_FILE
        path.write_text(json.dumps(self._scan.report(examples), indent=2) + "\n")
