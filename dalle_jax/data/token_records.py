"""The image-token dataset: one record per image, in ArrayRecord shards that grain reads by index.

A dataset directory holds `manifest.json` and, per split, shards named `{split}-{index:05d}.array_record`
(written with `group_size:1`, as grain's random access wants). Each record is one msgpack map:

    codes     bytes: the VQGAN's code indices in row-major order, little-endian int32 (grid * grid values)
    captions  array of str: the example's caption first, then its paraphrases where the dataset has them
    scene     nil, or the captioned_shapes scene: {"objects": [{"color", "shape", "size", "cell": str,
              "box": [x0, y0, x1, y1]}, ...], "relation": str}

The manifest is a JSON object with at least `format` (FORMAT), `version` (VERSION), `complete` (whether every
shard is written) and `splits` ({split: {"examples": int, "shards": [file name, ...]}}, shards in reading
order); the stage that writes the dataset adds what identifies its inputs. A split can be read only once the
manifest says the dataset is complete.
"""
from __future__ import annotations

import json
import re
from typing import Mapping, Sequence, SupportsIndex

import grain
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from dalle_jax import storage

FORMAT = "dalle_jax.token_records"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_OBJECT_NAMES = ("color", "shape", "size", "cell")
_INT32 = np.iinfo(np.int32)

ENCODED_DIR = "encoded"  # the image-token records' folder inside a seq2seq work directory

def shard_filename(split: str, index: int) -> str:
    if not _SPLIT_NAME.match(split):
        raise ValueError(f"split={split!r} cannot name a shard file; split names are letters, digits and '_'.")
    return f"{split}-{int(index):05d}{SHARD_SUFFIX}"


def is_shard_filename(name: str) -> bool:
    """Whether `name` is a shard file (or its unfinished `.tmp` twin) of this format."""
    return re.fullmatch(r"[A-Za-z0-9_]+-\d{5}" + re.escape(SHARD_SUFFIX) + r"(\.tmp)?", name) is not None


def _check_scene(scene: Mapping) -> dict:
    try:
        objects = [{**{key: str(obj[key]) for key in _OBJECT_NAMES}, "box": [int(v) for v in obj["box"]]}
                   for obj in scene["objects"]]
        relation = str(scene["relation"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"scene {scene!r} is not a captioned_shapes scene: it needs objects (each with "
                         f"{_OBJECT_NAMES} names and a box) and a relation name, as shapes_scene.scene_from_example "
                         "returns.") from e
    if any(len(obj["box"]) != 4 for obj in objects):
        raise ValueError(f"every object's box must be (x0, y0, x1, y1); got scene {scene!r}.")
    return {"objects": objects, "relation": relation}


def encode_record(codes, captions: Sequence[str], scene: Mapping | None = None) -> bytes:
    """One record's bytes; fails on codes that are not a 1-D integer array in int32 or on empty captions."""
    codes = np.asarray(codes)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer) or codes.size == 0:
        raise ValueError(f"codes must be a non-empty 1-D integer array (the flattened code grid); got dtype "
                         f"{codes.dtype} and shape {codes.shape}.")
    if codes.min() < 0 or codes.max() > _INT32.max:
        raise ValueError(f"codes must be codebook indices in [0, {_INT32.max}]; got values from {codes.min()} to "
                         f"{codes.max()}.")
    if isinstance(captions, (str, bytes)) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"captions must be a non-empty list of str (caption first, then paraphrases); got "
                         f"{captions!r}.")
    payload = {"codes": codes.astype("<i4").tobytes(), "captions": list(captions),
               "scene": None if scene is None else _check_scene(scene)}
    return msgpack.packb(payload, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """{"codes": int32 (grid*grid,), "captions": list[str], "scene": dict or None} from a record's bytes."""
    try:
        payload = msgpack.unpackb(data, raw=False)
        codes = np.frombuffer(payload["codes"], dtype="<i4").astype(np.int32)
        captions = list(payload["captions"])
        scene = payload["scene"]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
        raise ValueError(f"a record of {len(data)} bytes is not a {FORMAT} record ({e}).") from e
    if scene is not None:
        scene = {"objects": [{**obj, "box": tuple(obj["box"])} for obj in scene["objects"]],
                 "relation": scene["relation"]}
    return {"codes": codes, "captions": captions, "scene": scene}


class ShardWriter:
    """Appends records to one shard file; `close()` (or leaving a `with` block) finishes it."""

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self._writer = ArrayRecordWriter(path, "group_size:1")
        if not self._writer.ok():
            raise OSError(f"Cannot open {path} for writing an ArrayRecord shard.")

    def write(self, codes, captions: Sequence[str], scene: Mapping | None = None) -> None:
        self._writer.write(encode_record(codes, captions, scene))
        self.count += 1

    def close(self) -> None:
        if self._writer.is_open():
            self._writer.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def count_records(path: str) -> int:
    """Records in one shard file (read from its index, not by decoding records)."""
    reader = ArrayRecordReader(storage.local_copy(path, "image-token shard"))
    try:
        return reader.num_records()
    finally:
        reader.close()


def write_manifest(encoded_dir: str, manifest: Mapping) -> None:
    """Writes the manifest atomically (a reader sees the old one or the new one, never half of one)."""
    record = {**manifest, "format": FORMAT, "version": VERSION}
    for field in ("complete", "splits"):
        if field not in record:
            raise ValueError(f"A {FORMAT} manifest needs the field {field!r}; got fields {sorted(record)}.")
    storage.write_atomic(storage.join(encoded_dir, MANIFEST), json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_manifest(encoded_dir: str) -> dict:
    path = storage.join(encoded_dir, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {encoded_dir!r} is not an image-token dataset. The "
                                "seq2seq stage's encode step writes one there.")
    try:
        with storage.open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete {encoded_dir!r} and encode again.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest.")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} is version {manifest.get('version')} of {FORMAT}; this code reads version "
                         f"{VERSION}. Encode the dataset again into a new directory.")
    return manifest


class TokenSource:
    """Random access to one split's decoded records, over all of its shards in order (a grain data source)."""

    def __init__(self, encoded_dir: str, split: str, paths: Sequence[str]):
        self.encoded_dir = encoded_dir
        self.split = split
        self._source = grain.sources.ArrayRecordDataSource(list(paths))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: SupportsIndex) -> dict:
        return decode_record(self._source[index])

    def __getitems__(self, indices: Sequence[SupportsIndex]) -> list[dict]:
        return [decode_record(data) for data in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"TokenSource({self.encoded_dir!r}, split={self.split!r}, examples={len(self)})"


def open_split(encoded_dir: str, split: str) -> TokenSource:
    manifest = read_manifest(encoded_dir)
    if not manifest["complete"]:
        raise ValueError(f"The image-token dataset in {encoded_dir!r} is not complete (its encoding was "
                         "interrupted); run the encode stage again to finish it.")
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"The image-token dataset in {encoded_dir!r} has no split {split!r}; it has "
                         f"{sorted(splits)}.")
    paths = [storage.join(encoded_dir, name) for name in splits[split]["shards"]]
    missing = [p for p in paths if not storage.exists(p)]
    if missing or not paths:
        raise FileNotFoundError(f"Split {split!r} of {encoded_dir!r} lists shards that are missing: "
                                f"{missing or 'none listed'}. Delete the directory and encode again.")
    # ArrayRecord reads local files only. Training shuffles over the whole split, so every process's share of a
    # split is drawn from all of its shards: each stages the split's shards (once) on its own scratch.
    source = TokenSource(encoded_dir, split, [storage.local_copy(p, f"{split} image-token shard") for p in paths])
    if len(source) != splits[split]["examples"]:
        raise ValueError(f"Split {split!r} of {encoded_dir!r} holds {len(source)} records but its manifest "
                         f"says {splits[split]['examples']}. Delete the directory and encode again.")
    return source
