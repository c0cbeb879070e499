"""Judged evaluation: examples from the encoded splits or a JSONL file, the report, and its command line."""
import json
import os

import numpy as np
import pytest
from absl import app, flags

from dalle_jax.inference import sampling
from dalle_jax.data import shapes_scene, token_records
from dalle_jax.shapes import evaluate_samples as ev, judge
from dalle_jax.inference.text_to_image import TextToImage
from tests.inference.test_text_to_image import sampling_workdir
from tests.shapes.test_judge import _one_object
from tests.shapes.test_judge_strict import _paint, _rounded_square

SETTINGS = dict(temperature=1.2, top_k=16, top_p=0.95, cond_scale=3.0)


@pytest.fixture(scope="module")
def pipe(sampling_workdir):  # noqa: F811
    return TextToImage.from_workdir(sampling_workdir["workdir"], batch_size=4)


@pytest.fixture(scope="module")
def report(pipe):
    return ev.evaluate_samples(pipe, max_examples=4, seed=3, progress=False, **SETTINGS)


def test_split_examples_are_the_canonical_captions_and_scenes(sampling_workdir):  # noqa: F811
    examples = ev.split_examples(sampling_workdir["workdir"], "test_compositional", max_examples=5)
    records = token_records.open_split(os.path.join(sampling_workdir["workdir"], "encoded"), "test_compositional")
    assert len(examples) == 5
    for i, example in enumerate(examples):
        assert example.prompt == records[i]["captions"][0]
        assert example.scene == shapes_scene.scene_from_example(records[i]["scene"])
    assert len(ev.split_examples(sampling_workdir["workdir"], "test")) == 16


def test_the_datasets_own_images_are_judged_correct(sampling_workdir):  # noqa: F811
    examples = ev.split_examples(sampling_workdir["workdir"], "test")
    rendered = np.stack([shapes_scene.render(e.scene, 32) for e in examples])
    result = ev.judge_images(examples, rendered)
    assert result["count"] == 16, result
    assert result["accuracy"] == result["exact_accuracy"] == result["spec_accuracy"] == 1.0, result
    assert sum(a["count"] > 0 for a in result["attributes"].values()) >= 4
    # Image i is judged against scene i: paired the other way round, most images show the wrong scene.
    assert ev.judge_images(examples, rendered[::-1])["accuracy"] < 0.5


def _one_object_scene(seed: int, color: str, shape: str) -> dict:
    rng = np.random.default_rng(seed)
    while len((scene := shapes_scene.sample_scene(rng, 32))["objects"]) != 1:
        pass
    return dict(scene, objects=[dict(scene["objects"][0], color=color, shape=shape)])


def test_one_object_pairs_split_the_one_object_scenes_by_colour_and_shape(sampling_workdir):  # noqa: F811
    circles = [_one_object_scene(seed, "purple", "circle") for seed in range(4)]
    other_size = next(scene for seed in range(4, 100) if (scene := _one_object_scene(seed, "purple", "circle"))
                      ["objects"][0]["size"] != circles[3]["objects"][0]["size"])
    square = _one_object_scene(3, "red", "square")
    test_examples = ev.split_examples(sampling_workdir["workdir"], "test")
    two_objects = next(e for e in test_examples if len(e.scene["objects"]) == 2)
    examples = [ev.Example("", scene) for scene in (*circles, square)] + [two_objects]
    drawn = [circles[0], circles[1], dict(circles[2], objects=[dict(circles[2]["objects"][0], shape="square")]),
             other_size, square, two_objects.scene]
    result = ev.judge_images(examples, np.stack([shapes_scene.render(scene, 32) for scene in drawn]))
    # Purple circle 3 is drawn as a square, circle 4 at the other size (its shape is right); the two-object scene is
    # left out; the pairs come in palette order (red first).
    assert list(result["one_object_pairs"]) == ["red square", "purple circle"]
    assert result["one_object_pairs"]["purple circle"] == dict(accuracy=0.5, count=4, shape=0.75)
    assert result["one_object_pairs"]["red square"] == dict(accuracy=1.0, count=1, shape=1.0)
    assert [e["correct"] for e in result["examples"]] == [True, True, False, False, True, True]


def test_strict_exact_and_spec_figures_of_a_set():
    square = _one_object("red", "square", "small", "top left")
    blob_scene = _one_object("green", "circle", "large", "center")
    x0 = blob_scene["objects"][0]["box"][0]
    left = _one_object("yellow", "triangle", "small", "left")["objects"][0]
    right = _one_object("purple", "circle", "small", "right")["objects"][0]
    pair = {"objects": [left, right], "relation": "to the left of"}
    extra_circle = shapes_scene.shape_mask("circle", 8)
    images = [
        shapes_scene.render(square, 32),  # right and exact
        _paint(shapes_scene.render(square, 32), extra_circle, 22, 22, "blue"),  # right, with an extra object
        _paint(shapes_scene.render({"objects": [], "relation": "none"}, 32), _rounded_square(14, 5.0), x0, x0,
               "green"),  # neither circle nor square: right only under the spec's reading
        _paint(shapes_scene.render(pair, 32), np.ones((8, 8), bool), 12, 24, "orange"),  # right, a third object
    ]
    examples = [ev.Example("", scene) for scene in (square, square, blob_scene, pair)]
    result = ev.judge_images(examples, np.stack(images))
    assert (result["accuracy"], result["exact_accuracy"], result["spec_accuracy"]) == (0.75, 0.25, 1.0)
    assert result["attributes"]["shape"] == dict(accuracy=0.75, exact_accuracy=0.25, spec_accuracy=1.0, count=4)
    assert result["attributes"]["size"] == dict(accuracy=1.0, exact_accuracy=pytest.approx(2 / 3), spec_accuracy=1.0,
                                                count=3)
    assert result["attributes"]["relation"] == dict(accuracy=1.0, exact_accuracy=0.0, spec_accuracy=1.0, count=1)
    assert [(e["correct"], e["exact"], e["spec_correct"], e["extra_objects"]) for e in result["examples"]] == [
        (True, True, True, 0), (True, False, True, 1), (False, False, True, 0), (True, False, True, 1)]
    assert result["examples"][2]["attributes"] == dict(color=True, shape=False, size=True, cell=True)
    # one_object_pairs reads shapes strictly too.
    assert result["one_object_pairs"]["green circle"] == dict(accuracy=0.0, count=1, shape=0.0)
    none_stated = ev.judge_images(examples[:1], np.stack(images[:1]))["attributes"]["relation"]
    assert none_stated == dict(accuracy=None, exact_accuracy=None, spec_accuracy=None, count=0)


def test_report_structure(report, pipe):
    assert set(report) == {"workdir", "step", "seed", "settings", "scorer", "sets"}
    assert report["scorer"] == "seq2seq"
    assert report["step"] == 12 and report["seed"] == 3 and report["settings"] == dict(SETTINGS, candidates=1)
    assert report["workdir"] == pipe.seq2seq.workdir
    assert list(report["sets"]) == ["test", "test_compositional"]
    for result in report["sets"].values():
        assert set(result) == {"source", "count", "accuracy", "exact_accuracy", "spec_accuracy", "attributes",
                               "one_object_pairs", "examples"}
        assert result["count"] == len(result["examples"]) == 4
        assert set(result["attributes"]) == set(judge.ATTRIBUTES)
        for figures in result["attributes"].values():
            assert set(figures) == {"accuracy", "exact_accuracy", "spec_accuracy", "count"}
        for example in result["examples"]:
            assert set(example) == {"index", "prompt", "correct", "exact", "spec_correct", "extra_objects",
                                    "attributes"}
    json.dumps(report)  # plain JSON types only


def test_candidates_reach_the_sampler(pipe, monkeypatch):
    drawn = []
    generate = pipe.generate

    def spy(text_ids, seed, settings, **kw):
        drawn.append(settings.candidates)
        return generate(text_ids, seed, settings, **kw)

    monkeypatch.setattr(pipe, "generate", spy)
    report = ev.evaluate_samples(pipe, splits=["test"], max_examples=3, seed=3, progress=False, candidates=2,
                                 **SETTINGS)
    assert report["settings"]["candidates"] == 2 and drawn == [2]
    assert report["sets"]["test"]["count"] == 3


def test_report_accuracy_is_the_mean_of_the_per_image_judgements(report, pipe):
    for split, result in report["sets"].items():
        examples = ev.split_examples(pipe.seq2seq.workdir, split, max_examples=4)
        # Image i comes from (seed, i), so it can be sampled again, here in other batches, and judged afresh.
        images = pipe([e.prompt for e in examples], num_images=1, seed=3, batch_size=3, **SETTINGS).images[:, 0]
        judgements = [judge.judge(image, e.scene, strict=True) for image, e in zip(images, examples)]
        spec = [judge.judge(image, e.scene) for image, e in zip(images, examples)]
        assert [r["correct"] for r in result["examples"]] == [j.correct for j in judgements]
        assert [r["exact"] for r in result["examples"]] == [j.exact for j in judgements]
        assert [r["spec_correct"] for r in result["examples"]] == [j.correct for j in spec]
        assert [r["attributes"] for r in result["examples"]] == [j.attributes for j in judgements]
        assert result["accuracy"] == pytest.approx(np.mean([j.correct for j in judgements]))
        assert result["exact_accuracy"] == pytest.approx(np.mean([j.exact for j in judgements]))
        assert result["spec_accuracy"] == pytest.approx(np.mean([j.correct for j in spec]))
        for name, figures in result["attributes"].items():
            values = [j.attributes[name] for j in judgements if name in j.attributes]
            assert figures["count"] == len(values)
            assert figures["accuracy"] == (pytest.approx(np.mean(values)) if values else None)


def _scenes_file(path, sampling_workdir, count):  # noqa: F811
    examples = ev.split_examples(sampling_workdir["workdir"], "validation", max_examples=count)
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps({"prompt": e.prompt, "scene": e.scene}) + "\n\n")
    return examples


def test_command_line_writes_the_report_of_a_prompts_file(sampling_workdir, pipe, tmp_path):  # noqa: F811
    scenes = str(tmp_path / "scenes.jsonl")
    examples = _scenes_file(scenes, sampling_workdir, 3)
    assert ev.read_prompts_file(scenes) == examples
    fv = flags.FlagValues()
    ev.define_flags(fv)
    out = tmp_path / "reports" / "report.json"
    fv(["evaluate_samples", f"--workdir={sampling_workdir['workdir']}", f"--prompts_file={scenes}",
        f"--out={out}", "--seed=3", "--batch_size=4", *[f"--{k}={v}" for k, v in SETTINGS.items()]])
    written = ev.run(fv)
    with open(out) as f:
        assert json.load(f) == written
    assert list(written["sets"]) == ["scenes.jsonl"] and written["sets"]["scenes.jsonl"]["count"] == 3
    direct = ev.evaluate_samples(pipe, prompts_file=scenes, seed=3, progress=False, **SETTINGS)
    assert direct["sets"]["scenes.jsonl"]["examples"] == written["sets"]["scenes.jsonl"]["examples"]


def test_bad_inputs_fail_before_sampling(sampling_workdir, pipe, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sampling, "sample_image_tokens", lambda *a, **k: pytest.fail("sampled"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a red circle", "scene": {"objects": [], "relation": "none"}}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not a .*scene"):
        ev.evaluate_samples(pipe, prompts_file=str(bad))
    with pytest.raises(FileNotFoundError, match="Prompts file .* does not exist"):
        ev.evaluate_samples(pipe, prompts_file=str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="has no split 'nope'"):
        ev.evaluate_samples(pipe, splits=["test", "nope"])
    with pytest.raises(ValueError, match="max_examples=0 must be an integer >= 1"):
        ev.evaluate_samples(pipe, max_examples=0)
    with pytest.raises(ValueError, match="top_p=2 must be in"):
        ev.evaluate_samples(pipe, top_p=2)
    # A dataset without scenes (captioned_folder) cannot be judged.
    encoded = tmp_path / "folder_run" / "encoded"
    encoded.mkdir(parents=True)
    with token_records.ShardWriter(str(encoded / token_records.shard_filename("test", 0))) as writer:
        writer.write(np.arange(64), ["a photo"])
    token_records.write_manifest(str(encoded), dict(complete=True, splits={"test": dict(
        examples=1, shards=[token_records.shard_filename("test", 0)])}))
    with pytest.raises(ValueError, match="has no scene: its dataset is not captioned_shapes"):
        ev.split_examples(str(tmp_path / "folder_run"), "test")
    for flag, message in (("--max_examples=0", "--max_examples=0 must be at least 1"),
                          ("--candidates=0", "--candidates=0 must be an integer >= 1"),
                          ("--reranker_workdir=/nonexistent", "--reranker_workdir='/nonexistent' does not exist")):
        fv = flags.FlagValues()
        ev.define_flags(fv)
        fv(["evaluate_samples", f"--workdir={sampling_workdir['workdir']}", f"--out={tmp_path / 'r.json'}", flag])
        with pytest.raises(app.UsageError, match=message):
            ev.run(fv)
