"""The image-token record format: writer/reader round trip, manifest rules, and errors on bad input."""
import json
import os

import grain
import numpy as np
import pytest

from dalle_jax.data import token_records

SCENE = {"objects": [{"color": "red", "shape": "circle", "size": "small", "cell": "top left", "box": (1, 2, 9, 10)},
                     {"color": "blue", "shape": "square", "size": "large", "cell": "right", "box": (20, 8, 34, 22)}],
         "relation": "to the left of"}


def write_split(directory, split, records, per_shard):
    names = []
    for index, start in enumerate(range(0, len(records), per_shard)):
        names.append(token_records.shard_filename(split, index))
        with token_records.ShardWriter(os.path.join(directory, names[-1])) as writer:
            for record in records[start:start + per_shard]:
                writer.write(**record)
    return dict(examples=len(records), shards=names)


def make_records(count, seed):
    rng = np.random.default_rng(seed)
    return [dict(codes=rng.integers(0, 16384, 16), captions=[f"caption {seed} {i}", f"other {i}"],
                 scene=SCENE if i % 2 else None) for i in range(count)]


@pytest.fixture
def dataset(tmp_path):
    train, test = make_records(7, 0), make_records(3, 1)
    splits = dict(train=write_split(tmp_path, "train", train, per_shard=3),
                  test=write_split(tmp_path, "test", test, per_shard=5))
    token_records.write_manifest(str(tmp_path), dict(complete=True, splits=splits, grid_size=4))
    return str(tmp_path), dict(train=train, test=test)


def test_round_trip_over_shards_in_order(dataset):
    directory, written = dataset
    source = token_records.open_split(directory, "train")
    assert len(source) == 7 and len(token_records.open_split(directory, "test")) == 3
    for i, expected in enumerate(written["train"]):
        record = source[i]
        assert record["codes"].dtype == np.int32 and record["codes"].shape == (16,)
        np.testing.assert_array_equal(record["codes"], expected["codes"])
        assert record["captions"] == expected["captions"]
        assert record["scene"] == expected["scene"]
    # Boxes come back as tuples, the form judge.scene_from_example gives.
    assert source[1]["scene"] == SCENE and source[0]["scene"] is None
    batch = source.__getitems__([6, 0])
    np.testing.assert_array_equal(batch[0]["codes"], written["train"][6]["codes"])
    dataset_view = grain.MapDataset.source(source).map(lambda r: r["captions"][0])
    assert [dataset_view[i] for i in range(7)] == [f"caption 0 {i}" for i in range(7)]
    assert token_records.read_manifest(directory)["grid_size"] == 4


def test_missing_split_names_the_splits_present(dataset):
    directory, _ = dataset
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        token_records.open_split(directory, "validation")


def test_missing_manifest_and_incomplete_dataset(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="not an image-token dataset"):
        token_records.open_split(str(tmp_path / "nowhere"), "train")
    directory, _ = dataset
    manifest = token_records.read_manifest(directory)
    token_records.write_manifest(directory, dict(manifest, complete=False))
    with pytest.raises(ValueError, match="not complete"):
        token_records.open_split(directory, "train")


def test_manifest_that_disagrees_with_its_shards(dataset):
    directory, _ = dataset
    manifest = token_records.read_manifest(directory)
    manifest["splits"]["train"]["examples"] = 8
    token_records.write_manifest(directory, manifest)
    with pytest.raises(ValueError, match="holds 7 records but its manifest says 8"):
        token_records.open_split(directory, "train")
    os.remove(os.path.join(directory, "test-00000.array_record"))
    with pytest.raises(FileNotFoundError, match="test-00000.array_record"):
        token_records.open_split(directory, "test")


def test_foreign_or_newer_manifest_is_refused(tmp_path):
    path = tmp_path / token_records.MANIFEST
    path.write_text(json.dumps({"complete": True, "splits": {}}))
    with pytest.raises(ValueError, match="is not a dalle_jax.token_records manifest"):
        token_records.read_manifest(str(tmp_path))
    path.write_text(json.dumps({"format": token_records.FORMAT, "version": 99, "complete": True, "splits": {}}))
    with pytest.raises(ValueError, match="version 99"):
        token_records.read_manifest(str(tmp_path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        token_records.read_manifest(str(tmp_path))
    with pytest.raises(ValueError, match="needs the field 'splits'"):
        token_records.write_manifest(str(tmp_path), dict(complete=True))


@pytest.mark.parametrize("codes, match", [
    (np.zeros((4, 4), np.int32), "1-D integer array"),
    (np.zeros(16, np.float32), "1-D integer array"),
    (np.array([], np.int32), "1-D integer array"),
    (np.array([3, -1]), r"codebook indices in \[0,"),
    (np.array([2**31]), r"codebook indices in \[0,"),
])
def test_bad_codes_are_refused(codes, match):
    with pytest.raises(ValueError, match=match):
        token_records.encode_record(codes, ["a caption"])


@pytest.mark.parametrize("captions", ["a caption", [], [b"bytes"], None])
def test_bad_captions_are_refused(captions):
    with pytest.raises(ValueError, match="captions must be a non-empty list of str"):
        token_records.encode_record(np.arange(4), captions)


def test_bad_scene_and_bad_bytes_are_refused():
    with pytest.raises(ValueError, match="not a captioned_shapes scene"):
        token_records.encode_record(np.arange(4), ["c"], {"objects": [{"color": "red"}], "relation": "none"})
    bad_box = {"objects": [dict(SCENE["objects"][0], box=(1, 2, 3))], "relation": "none"}
    with pytest.raises(ValueError, match="box must be"):
        token_records.encode_record(np.arange(4), ["c"], bad_box)
    with pytest.raises(ValueError, match="not a dalle_jax.token_records record"):
        token_records.decode_record(b"\x93\x01\x02\x03")


def test_shard_names():
    assert token_records.shard_filename("test_compositional", 3) == "test_compositional-00003.array_record"
    assert token_records.is_shard_filename("train-00012.array_record")
    assert token_records.is_shard_filename("train-00012.array_record.tmp")
    assert not token_records.is_shard_filename("notes.txt")
    with pytest.raises(ValueError, match="cannot name a shard file"):
        token_records.shard_filename("train[:10%]", 0)
