"""Caption probe: twin captions, likelihoods that agree with the trainer's evaluation loss, the report, and errors."""
import json
import os

import numpy as np
import pytest
from absl import app, flags

from dalle_jax import runs
from dalle_jax.data import shapes_scene, token_records
from dalle_jax.shapes import caption_probe as probe
from dalle_jax.trainers import seq2seq_step
from tests.inference.test_text_to_image import sampling_workdir

SCENE = {"objects": [{"color": "red", "shape": "circle", "size": "small", "cell": "left"},
                     {"color": "blue", "shape": "square", "size": "large", "cell": "right"}],
         "relation": "to the left of"}


def test_twin_captions_change_only_which_object_is_which():
    assert probe.twin_caption(SCENE, "relation_reversed") == "a red circle to the right of a blue square"
    assert probe.twin_caption(SCENE, "colors_exchanged") == "a blue circle to the left of a red square"
    assert probe.twin_caption(SCENE, "shapes_exchanged") == "a red square to the left of a blue circle"
    below = dict(SCENE, relation="below")
    assert probe.twin_caption(below, "relation_reversed") == "a red circle above a blue square"
    same_colour = {"objects": [dict(o, color="green") for o in SCENE["objects"]], "relation": "above"}
    assert probe.twin_caption(same_colour, "colors_exchanged") is None
    assert probe.twin_caption(same_colour, "shapes_exchanged") == "a green square above a green circle"


def test_bad_scenes_and_twins_are_refused():
    with pytest.raises(ValueError, match="needs a two-object scene, got 1"):
        probe.twin_caption({"objects": SCENE["objects"][:1], "relation": "none"}, "relation_reversed")
    with pytest.raises(ValueError, match="twin='mirrored' is unknown"):
        probe.twin_caption(SCENE, "mirrored")


@pytest.fixture(scope="module")
def loaded(sampling_workdir):  # noqa: F811
    return runs.load_seq2seq(sampling_workdir["workdir"])


def _records(loaded, split="test"):
    source = token_records.open_split(os.path.join(loaded.workdir, token_records.ENCODED_DIR), split)
    return [source[i] for i in range(len(source))]


def test_likelihoods_agree_with_the_trainers_evaluation_loss(loaded):
    records = _records(loaded)[:6]
    text = np.stack([loaded.tokenizer.encode(r["captions"][0], loaded.config.model.text_length) for r in records])
    codes = np.stack([np.asarray(r["codes"], np.int32) for r in records])
    log_likelihoods = probe.log_likelihood_fn(loaded)(text, codes)
    metrics = seq2seq_step.eval_step(seq2seq_step.create(loaded.config, loaded.mesh, initialize=False)[0], loaded.params, dict(text_ids=text, codes=codes))
    assert log_likelihoods.shape == (6,)
    np.testing.assert_allclose(-log_likelihoods.mean() / codes.shape[1], float(metrics["cross_entropy"]),
                               rtol=1e-5)
    # Each image's own: its likelihood changes when only its caption does.
    swapped = probe.log_likelihood_fn(loaded)(text[::-1], codes)
    assert not np.allclose(swapped, log_likelihoods)


def test_report_counts_every_two_object_scene_once_per_twin(loaded):
    report = probe.probe_split(loaded, "test", batch_size=3)
    scenes = [shapes_scene.scene_from_example(r["scene"]) for r in _records(loaded)]
    two = [s for s in scenes if len(s["objects"]) == 2]
    assert two, "the tiny test split should hold two-object scenes"
    assert report["split"] == "test" and report["step"] == loaded.step and set(report["twins"]) == set(probe.TWINS)
    for twin, result in report["twins"].items():
        expected = sum(probe.twin_caption(s, twin) is not None for s in two)
        assert result["count"] == expected
        assert sum(r["count"] for r in result["by_relation"].values()) == expected
        if expected:
            assert 0.0 <= result["true_wins"] <= 1.0 and np.isfinite(result["median_margin"])
    # Batching changes the figures by float rounding only.
    rebatched = probe.probe_split(loaded, "test", batch_size=100)
    for twin, result in report["twins"].items():
        other = rebatched["twins"][twin]
        assert (other["count"], other.get("true_wins")) == (result["count"], result.get("true_wins"))
        assert other.get("median_margin") == pytest.approx(result.get("median_margin"), abs=1e-3)


def test_command_line_writes_the_report_and_names_bad_flags(sampling_workdir, loaded, tmp_path):  # noqa: F811
    def run(*args):
        fv = flags.FlagValues()
        probe.define_flags(fv)
        fv(["caption_probe", f"--workdir={sampling_workdir['workdir']}", *args])
        return probe.run(fv)

    out = tmp_path / "probe.json"
    report = run(f"--out={out}", "--max_examples=8")
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    with pytest.raises(app.UsageError, match="--max_examples=0 must be at least 1"):
        run(f"--out={out}", "--max_examples=0")
    scenes = [shapes_scene.scene_from_example(r["scene"]) for r in _records(loaded, "test_compositional")]
    leading_single = next(i for i, scene in enumerate(scenes) if len(scene["objects"]) == 2)
    assert leading_single >= 1, "the tiny test_compositional split starts with single objects"
    with pytest.raises(ValueError, match="hold no two-object scene"):
        probe.probe_split(loaded, "test_compositional", max_examples=leading_single)
