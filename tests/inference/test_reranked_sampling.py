"""Sampling with a reranker: of each image's candidates the pipeline keeps the one whose picture the caption model
finds its prompt likeliest for."""
import dataclasses
import json
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
from absl import flags

from dalle_jax import runs
from dalle_jax.models import captioner as captioner_lib
from dalle_jax.inference import sample
from dalle_jax.inference.text_to_image import TextToImage
from dalle_jax.shapes import evaluate_samples as ev
from tests.inference.test_text_to_image import sampling_workdir
from tests.trainers.test_captioner_trainer import captioner_run, pixel_captioner_run  # noqa: F401  (once per session)

PROMPTS = ["a small red circle in the top left", "a green triangle above a purple circle"]
SETTINGS = dict(temperature=1.2, top_k=16, top_p=0.95, cond_scale=3.0)
K, NUM_IMAGES, SEED = 4, 3, 11


@pytest.fixture(scope="module")
def reranked_pipe(sampling_workdir, captioner_run):  # noqa: F811
    return TextToImage.from_workdir(sampling_workdir["workdir"], reranker_workdir=captioner_run[0], batch_size=8)


@pytest.fixture(scope="module")
def plain_pipe(sampling_workdir):  # noqa: F811
    return TextToImage.from_workdir(sampling_workdir["workdir"], batch_size=8)


@pytest.fixture(scope="module")
def reranked(reranked_pipe):
    return reranked_pipe(PROMPTS, num_images=NUM_IMAGES, seed=SEED, candidates=K, **SETTINGS)


def assert_kept_draws_are_the_captioners_best(reranked_pipe, plain_pipe, reranked):
    assert reranked.scorer == "reranker"
    # With one candidate, image i*K + c is draw i*K + c: every candidate of the K-candidate call, in order.
    singles = plain_pipe(PROMPTS, num_images=NUM_IMAGES * K, seed=SEED, candidates=1, **SETTINGS)
    reads_codes = captioner_lib.reads(reranked_pipe.reranker.config.model) == "code_features"
    read = singles.image_ids.reshape(-1, singles.image_ids.shape[-1]) if reads_codes else \
        singles.images.reshape(-1, 32, 32, 3)
    text_ids = np.repeat(singles.text_ids, NUM_IMAGES * K, axis=0)
    scores = np.asarray(reranked_pipe.reranker.model().log_likelihood(read, text_ids)).reshape(
        len(PROMPTS), NUM_IMAGES, K)
    best = scores.argmax(-1)
    image_index = np.arange(len(PROMPTS) * NUM_IMAGES).reshape(len(PROMPTS), NUM_IMAGES)
    np.testing.assert_array_equal(reranked.draws, image_index * K + best)
    np.testing.assert_allclose(reranked.scores, scores.max(-1), atol=1e-3)
    candidates = singles.image_ids.reshape(len(PROMPTS), NUM_IMAGES, K, -1)
    chosen = np.take_along_axis(candidates, best[..., None, None], axis=2)[:, :, 0]
    np.testing.assert_array_equal(reranked.image_ids, chosen)
    pictures = singles.images.reshape(len(PROMPTS), NUM_IMAGES, K, 32, 32, 3)
    np.testing.assert_array_equal(reranked.images,
                                  np.take_along_axis(pictures, best[..., None, None, None, None], axis=2)[:, :, 0])
    # The seq2seq model's own choice differs somewhere, so the draws above were picked by the captioner.
    by_seq2seq = plain_pipe(PROMPTS, num_images=NUM_IMAGES, seed=SEED, candidates=K, **SETTINGS)
    assert by_seq2seq.scorer == "seq2seq"
    assert np.any(by_seq2seq.draws != reranked.draws)


def test_each_image_is_the_candidate_the_captioner_scores_highest(reranked_pipe, plain_pipe, reranked):
    # The tiny recipe's caption model reads the draws' codes: only the kept ones are decoded.
    assert captioner_lib.reads(reranked_pipe.reranker.config.model) == "code_features"
    assert_kept_draws_are_the_captioners_best(reranked_pipe, plain_pipe, reranked)


def test_a_caption_model_that_reads_pixels_keeps_its_best_candidate(sampling_workdir, pixel_captioner_run,  # noqa: F811
                                                                     plain_pipe):
    pipe = TextToImage.from_workdir(sampling_workdir["workdir"], reranker_workdir=pixel_captioner_run[0],
                                    batch_size=8)
    assert captioner_lib.reads(pipe.reranker.config.model) == "pixels"
    reranked = pipe(PROMPTS, num_images=NUM_IMAGES, seed=SEED, candidates=K, **SETTINGS)
    assert_kept_draws_are_the_captioners_best(pipe, plain_pipe, reranked)


def test_one_candidate_needs_no_reranking(reranked_pipe, plain_pipe):
    # 8 images: batches of the shape the test above compiled.
    with_reranker = reranked_pipe(PROMPTS, num_images=4, seed=SEED, candidates=1, **SETTINGS)
    without = plain_pipe(PROMPTS, num_images=4, seed=SEED, candidates=1, **SETTINGS)
    assert with_reranker.scorer == without.scorer == "seq2seq"
    np.testing.assert_array_equal(with_reranker.image_ids, without.image_ids)
    np.testing.assert_array_equal(with_reranker.images, without.images)
    np.testing.assert_array_equal(with_reranker.draws, without.draws)
    np.testing.assert_allclose(with_reranker.scores, without.scores, rtol=1e-6)


def test_records_name_the_scorer(reranked):
    records = reranked.records()
    assert len(records) == len(PROMPTS) * NUM_IMAGES
    assert {r["scorer"] for r in records} == {"reranker"}
    assert [r["draw"] for r in records] == reranked.draws.reshape(-1).tolist()
    assert [r["score"] for r in records] == pytest.approx(reranked.scores.reshape(-1).tolist())
    json.dumps(records)


def test_the_kept_image_is_the_same_whatever_the_batch(reranked_pipe, reranked):
    # Batches of 8 draws (the fixture's) hold two images each; of 4 draws, one.
    again = reranked_pipe(PROMPTS, num_images=NUM_IMAGES, seed=SEED, candidates=K, batch_size=4, **SETTINGS)
    np.testing.assert_array_equal(again.image_ids, reranked.image_ids)
    np.testing.assert_array_equal(again.images, reranked.images)
    np.testing.assert_array_equal(again.draws, reranked.draws)
    np.testing.assert_allclose(again.scores, reranked.scores, atol=1e-4)


def test_another_runs_reranker_is_refused_before_restoring(sampling_workdir, captioner_run,  # noqa: F811
                                                           tmp_path, monkeypatch):
    other = str(tmp_path / "other_reranker")
    shutil.copytree(captioner_run[0], other)
    path = os.path.join(other, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_sha256"] = "0" * 64
    with open(path, "w") as f:
        json.dump(config, f)

    def restored(*args, **kwargs):
        raise AssertionError("a checkpoint was restored before the reranker was checked")

    for name in ("load_seq2seq", "load_vqgan", "load_reranker"):
        monkeypatch.setattr(runs, name, restored)
    with pytest.raises(ValueError, match="tokenizer"):
        TextToImage.from_workdir(sampling_workdir["workdir"], reranker_workdir=other)


def test_a_reranker_of_other_shapes_is_refused(reranked_pipe):
    # Same tokenizer, but trained for a run with longer captions: its checkpoint would load, its reading would not fit.
    loaded = reranked_pipe.reranker
    config = ml_collections.ConfigDict(loaded.config.to_dict())
    config.model.text_length = 48
    with pytest.raises(ValueError, match="reads 48 text tokens"):
        TextToImage(reranked_pipe.seq2seq, reranked_pipe.vqgan, reranked_pipe.mesh,
                    reranker=dataclasses.replace(loaded, config=config))


# The reranker registered for a run (`reranker.json`) is the default; "" turns it off.

@pytest.fixture(scope="module")
def registered_run(sampling_workdir, captioner_run, tmp_path_factory):  # noqa: F811
    """A copy of the shared seq2seq run (which the other tests sample without a reranker) with the tiny captioner
    registered as its reranker, as the trainer registers it when it finishes."""
    workdir = str(tmp_path_factory.mktemp("registered") / "dalle")
    shutil.copytree(sampling_workdir["workdir"], workdir)
    runs.register_reranker(workdir, captioner_run[0], 6)
    return workdir


@pytest.fixture(scope="module")
def registered_pipe(registered_run):
    return TextToImage.from_workdir(registered_run, batch_size=8)


def _flag_args(workdir, *more):
    return [f"--workdir={workdir}", f"--seed={SEED}", f"--candidates={K}", "--batch_size=8",
            *[f"--{k}={v}" for k, v in SETTINGS.items()], *more]


def _sample_command(*args) -> list[dict]:
    fv = flags.FlagValues()
    sample.define_flags(fv)
    fv(["sample.py", *args])
    sample.run(fv)
    with open(os.path.join(fv.out_dir, sample.SAMPLES_FILE)) as f:
        return [json.loads(line) for line in f]


def test_the_registered_reranker_picks_by_default(registered_pipe, captioner_run, reranked):  # noqa: F811
    assert registered_pipe.reranker.workdir == os.path.abspath(captioner_run[0])
    samples = registered_pipe(PROMPTS, num_images=NUM_IMAGES, seed=SEED, candidates=K, **SETTINGS)
    assert samples.scorer == "reranker"
    np.testing.assert_array_equal(samples.draws, reranked.draws)
    assert {json.dumps(r["reranker"]) for r in samples.records()} == {
        json.dumps(dict(workdir=os.path.abspath(captioner_run[0]), step=6))}
    # One candidate per image: nothing to pick, and the records say the seq2seq model scored it.
    single = registered_pipe(PROMPTS, num_images=4, seed=SEED, candidates=1, **SETTINGS)
    assert single.scorer == "seq2seq" and {r["reranker"] for r in single.records()} == {None}


def test_the_sample_command_uses_the_registered_reranker_unless_turned_off(registered_run, captioner_run,  # noqa: F811
                                                                           reranked, tmp_path):
    args = _flag_args(registered_run, f"--prompt={PROMPTS[0]}", f"--num_images={NUM_IMAGES}")
    records = _sample_command(*args, f"--out_dir={tmp_path / 'default'}")
    assert {r["scorer"] for r in records} == {"reranker"}
    assert all(r["reranker"] == dict(workdir=os.path.abspath(captioner_run[0]), step=6) for r in records)
    assert [r["draw"] for r in records] == reranked.draws[0].tolist()
    off = _sample_command(*args, "--reranker_workdir=", f"--out_dir={tmp_path / 'off'}")
    assert {r["scorer"] for r in off} == {"seq2seq"} and {r["reranker"] for r in off} == {None}


def test_the_evaluation_reports_the_registered_reranker_unless_turned_off(registered_pipe, registered_run,
                                                                          captioner_run, tmp_path):  # noqa: F811
    report = ev.evaluate_samples(registered_pipe, splits=["test"], max_examples=2, seed=SEED, candidates=K,
                                 progress=False, **SETTINGS)
    assert report["scorer"] == "reranker"
    assert report["reranker"] == dict(workdir=os.path.abspath(captioner_run[0]), step=6)
    fv = flags.FlagValues()
    ev.define_flags(fv)
    fv(["evaluate_samples", *_flag_args(registered_run, "--split=test", "--max_examples=2", "--reranker_workdir=",
                                        f"--out={tmp_path / 'report.json'}")])
    off = ev.run(fv)
    assert off["scorer"] == "seq2seq" and "reranker" not in off


def test_a_deleted_registered_reranker_fails_with_the_fix_before_restoring(sampling_workdir, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    workdir = str(tmp_path / "dalle")
    shutil.copytree(sampling_workdir["workdir"], workdir)
    (tmp_path / "reranker").mkdir()
    registration = runs.register_reranker(workdir, str(tmp_path / "reranker"), 6)
    (tmp_path / "reranker").rmdir()

    def restored(*args, **kwargs):
        raise AssertionError("a checkpoint was restored before the registration was checked")

    for name in ("load_seq2seq", "load_vqgan", "load_reranker"):
        monkeypatch.setattr(runs, name, restored)
    message = f"{re.escape(registration)} registers the reranker .* no longer exists.*--reranker_workdir=\"\""
    with pytest.raises(FileNotFoundError, match=message):
        TextToImage.from_workdir(workdir)
    with pytest.raises(FileNotFoundError, match=message):
        _sample_command(*_flag_args(workdir, "--prompt=x", f"--out_dir={tmp_path / 'out'}"))
    # Turned off, the registration is not read: loading goes on (to the first restore, stopped here).
    with pytest.raises(AssertionError, match="restored before"):
        TextToImage.from_workdir(workdir, reranker_workdir="")


def test_a_registered_reranker_that_does_not_fit_names_its_registration(sampling_workdir, captioner_run, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    workdir, other = str(tmp_path / "dalle"), str(tmp_path / "reranker")
    shutil.copytree(sampling_workdir["workdir"], workdir)
    shutil.copytree(captioner_run[0], other, ignore=shutil.ignore_patterns("checkpoints"))
    config = runs.load_config(other)
    config.tokenizer_sha256 = "0" * 64  # as if trained before the run's tokenizer was replaced
    runs.save_config(config, other)
    registration = runs.register_reranker(workdir, other, 6)
    monkeypatch.setattr(runs, "load_seq2seq", lambda *a, **k: pytest.fail("restored before checking"))
    with pytest.raises(ValueError, match=f"tokenizer.*registered in {re.escape(registration)}.*"
                                         f"--reranker_workdir=\"\""):
        TextToImage.from_workdir(workdir)
