"""Tests for the captioned_shapes TFDS builder: preparation to ArrayRecord and random access."""
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dalle_jax.data import shapes_scene as ss
from dalle_jax.data.captioned_shapes import (
    DEFAULT_SPLIT_SIZES,
    CaptionedShapes,
    CaptionedShapesConfig,
    make_example,
    scene_key,
    compositional_test_scenes,
)
from dalle_jax.shapes import judge

TINY_SIZES = {"train": 64, "validation": 16, "test": 16, "test_compositional": 16, "validation_compositional": 16}


def _prepare(data_dir):
    config = CaptionedShapesConfig(name="tiny", image_size=32, split_sizes=dict(TINY_SIZES))
    builder = CaptionedShapes(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return builder


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def splits(builder):
    return {split: [source[i] for i in range(len(source))] for split, source in builder.as_data_source().items()}


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def test_registered_with_the_documented_configs():
    assert tfds.builder_cls("captioned_shapes") is CaptionedShapes
    assert str(CaptionedShapes.VERSION) == "1.0.0"
    configs = CaptionedShapes.builder_configs
    assert sorted(configs) == ["s128", "s256", "s32", "s64"]
    assert [configs[f"s{s}"].image_size for s in (32, 64, 128, 256)] == [32, 64, 128, 256]
    assert CaptionedShapes.DEFAULT_CONFIG_NAME == "s32"
    assert configs["s32"].split_sizes == DEFAULT_SPLIT_SIZES == {
        "train": 50_000, "validation": 2_000, "test": 2_000, "test_compositional": 1_000,
        "validation_compositional": 1_000}


def test_features_and_split_sizes(builder, splits):
    features = builder.info.features
    assert features["image"].shape == (32, 32, 3)
    assert features["relation"].names == list(ss.RELATIONS)
    assert features["objects"]["cell"].names == list(ss.CELLS)
    assert features["objects"]["color"].names == list(ss.COLORS)
    assert {s: builder.info.splits[s].num_examples for s in TINY_SIZES} == TINY_SIZES
    assert {s: len(v) for s, v in splits.items()} == TINY_SIZES


def test_examples_match_their_scene(splits):
    for split, examples in splits.items():
        for index, example in enumerate(examples):
            scene = ss.scene_from_example(example)
            image = example["image"]
            assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
            # Records are stored in index order and decode to the rendering of their own scene.
            np.testing.assert_array_equal(image, ss.render(scene, 32))
            excluded = compositional_test_scenes(TINY_SIZES["test_compositional"], 32)
            reference = make_example(split, index, 32, excluded if split == "validation_compositional" else frozenset())
            assert _text(example["caption"]) == reference["caption"] == ss.canonical_caption(scene)
            paraphrases = [_text(p) for p in example["paraphrases"]]
            assert paraphrases == reference["paraphrases"] and paraphrases[0] == _text(example["caption"])
            for caption in paraphrases:
                words = set(caption.replace(",", " ").split())
                for obj in scene["objects"]:
                    assert obj["color"] in words and obj["shape"] in words, caption
            assert (scene["relation"] == "none") == (len(scene["objects"]) == 1)


def test_held_out_pairs_follow_the_split(splits):
    for split, examples in splits.items():
        for example in examples:
            pairs = {(o["color"], o["shape"]) for o in ss.scene_from_example(example)["objects"]}
            if split.endswith("_compositional"):
                assert pairs & set(ss.HELD_OUT), pairs
            else:
                assert not pairs & set(ss.HELD_OUT), (split, pairs)


def test_validation_compositional_holds_no_scene_of_test_compositional():
    """validation_compositional tunes what test_compositional reports: the same kind of scene, never the same one."""
    excluded = compositional_test_scenes(300, 32)
    validation = [make_example("validation_compositional", i, 32, excluded) for i in range(300)]
    assert not {scene_key(v) for v in validation} & excluded
    assert all({(o["color"], o["shape"]) for o in v["objects"]} & set(ss.HELD_OUT) for v in validation)
    # Without the exclusion, a held-out pair's few one-object scenes repeat.
    undeduplicated = [make_example("validation_compositional", i, 32) for i in range(300)]
    assert sum(scene_key(v) in excluded for v in undeduplicated) > 50


def test_the_prepared_validation_compositional_split_avoids_the_prepared_test_split(splits):
    keys = {split: {scene_key(ss.scene_from_example(e)) for e in splits[split]}
            for split in ("validation_compositional", "test_compositional")}
    assert keys["validation_compositional"] and not keys["validation_compositional"] & keys["test_compositional"]


def test_judge_accepts_every_decoded_example(splits):
    judgements = [judge.judge(ex["image"], ex) for examples in splits.values() for ex in examples]
    assert judge.aggregate(judgements)["correct"] == 1.0


def test_preparing_twice_gives_the_same_bytes(builder, tmp_path):
    again = _prepare(tmp_path)
    for split in TINY_SIZES:
        first = sorted(builder.data_path.glob(f"*-{split}.array_record*"))
        second = sorted(again.data_path.glob(f"*-{split}.array_record*"))
        assert len(first) == len(second) >= 1
        for a, b in zip(first, second):
            assert a.read_bytes() == b.read_bytes()


def test_split_streams_differ_and_examples_are_reproducible():
    a, b = make_example("train", 5, 32), make_example("validation", 5, 32)
    assert a["image"] != b["image"] or a["caption"] != b["caption"]
    again = make_example("train", 5, 32)
    assert again["image"] == a["image"] and again["paraphrases"] == a["paraphrases"]
    decoded = np.asarray(Image.open(io.BytesIO(a["image"])))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8


def test_bad_configs_fail_loudly():
    with pytest.raises(ValueError, match="image_size"):
        CaptionedShapesConfig(name="bad", image_size=4)
    with pytest.raises(ValueError, match="trian"):
        CaptionedShapesConfig(name="bad", split_sizes={"trian": 10})
    with pytest.raises(ValueError, match="split_sizes\\['test'\\]"):
        CaptionedShapesConfig(name="bad", split_sizes={"test": 0})
