"""The Python API: loading a seq2seq work directory once, prompts -> images, batching and determinism."""
import dataclasses
import os
import pickle
import shutil
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from dalle_jax.configs import shapes_dalle, shapes_vqgan
from dalle_jax import parallel
from dalle_jax.inference import sampling
from dalle_jax import runs
from dalle_jax.data import pipeline as data_pipeline, token_records
from dalle_jax.inference.text_to_image import TextToImage
from dalle_jax.inference.sampling import SamplingSettings
from dalle_jax.trainers import encode_stage, seq2seq_step, text_stage
from dalle_jax.training import checkpointing
from tests.conftest import once_per_session
from tests.trainers.test_encode_stage import filled, filled_state, save_checkpoint

STEPS = (4, 12)  # checkpoints of the tiny run, holding different parameters
PROMPTS = ["a small red circle in the top left", "a green triangle above a purple circle"]
SETTINGS = dict(temperature=1.2, top_k=16, top_p=0.95, cond_scale=3.0)


def build_workdir(root: str, data_dir: str) -> dict:
    """A VQGAN work directory and a seq2seq work directory made the way the trainers make them (config, encoded
    records, tokenizer, orbax checkpoints of the trainer's state), with seeded random parameters instead of
    training: the API's tests need a real layout, not a good model, and training costs a minute on 2 cores."""
    vqgan_config = shapes_vqgan.get_config("tiny")
    vqgan_config.data.data_dir = data_dir
    vqgan_config.model.ch_mult = (1, 2, 2)  # an 8x8 grid of 32 codes, as the tiny seq2seq config expects
    vqgan_dir = os.path.join(root, "vqgan")
    runs.save_config(vqgan_config, vqgan_dir)
    save_checkpoint(vqgan_config, vqgan_dir, 5, filled_state(vqgan_config, parallel.make_mesh(vqgan_config.mesh), 0))

    config = shapes_dalle.get_config("tiny")
    config.data.data_dir = data_dir
    config.vqgan_workdir = vqgan_dir
    workdir = os.path.join(root, "dalle")
    runs.save_config(config, workdir)
    mesh = parallel.make_mesh(config.mesh)
    vqgan = runs.load_vqgan(vqgan_dir, mesh)
    encoded = os.path.join(workdir, "encoded")
    encode_stage.encode_dataset(config.data, vqgan, encoded, mesh, batch_size=config.data.encode_batch_size)
    train = token_records.open_split(encoded, "train")
    tokenizer = text_stage.prepare_tokenizer(config, workdir, (c for i in range(len(train))
                                                               for c in train[i]["captions"]))

    setup, _, shardings = seq2seq_step.create(config, mesh, initialize=False)
    model_class = seq2seq_step.model_class(config)
    abstract_params = nnx.state(nnx.eval_shape(lambda: model_class(config.model, rngs=nnx.Rngs(0))),
                                nnx.Param).to_pure_dict()
    abstract = dict(step=jax.ShapeDtypeStruct((), np.int32), params=abstract_params,
                    opt_state=jax.eval_shape(setup.tx.init, abstract_params))
    iterator = data_pipeline.train_iterator(
        train, None, global_batch=config.data.batch_size, seed=0,
        random_transform=data_pipeline.caption_and_codes(tokenizer, config.model.text_length, random_caption=True))
    checkpointer = checkpointing.Checkpointer(workdir, keep=5, save_every=1)
    params = {}
    for step in STEPS:
        state = filled(abstract, shardings, np.random.default_rng(step))
        checkpointer.save(step, state, iterator, force=True)
        params[step] = jax.device_get(state["params"])
    checkpointer.close()
    return dict(workdir=workdir, vqgan_workdir=vqgan_dir, params=params)


@pytest.fixture(scope="module")
def sampling_workdir(tmp_path_factory, shapes_data_dir, compilation_cache):
    """Built once per session, by whichever xdist worker asks first (pytest registers this fixture again in each
    module that imports it)."""
    def build(root):
        built = build_workdir(root, shapes_data_dir)
        with open(os.path.join(root, "params.pkl"), "wb") as f:
            pickle.dump(built.pop("params"), f)
        return built

    root, built = once_per_session(tmp_path_factory, "sampling", build)
    with open(os.path.join(root, "params.pkl"), "rb") as f:
        return dict(built, params=pickle.load(f))


@pytest.fixture(scope="module")
def pipe(sampling_workdir):
    return TextToImage.from_workdir(sampling_workdir["workdir"], batch_size=4)


def test_loads_the_newest_checkpoint_or_a_chosen_one(sampling_workdir, pipe):
    assert pipe.seq2seq.step == STEPS[-1]
    for step, loaded in ((STEPS[-1], pipe.seq2seq),
                         (STEPS[0], runs.load_seq2seq(sampling_workdir["workdir"], pipe.mesh, step=STEPS[0]))):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), sampling_workdir["params"][step])
    with pytest.raises(ValueError, match="no checkpoint of step 7; it has steps"):
        runs.load_seq2seq(sampling_workdir["workdir"], pipe.mesh, step=7)
    # The run's config.sampling fills in the settings a call leaves out.
    assert pipe.default_settings == SamplingSettings(temperature=0.7, top_k=8, top_p=1.0, cond_scale=1.5)
    assert pipe.sampling_settings(top_k=5) == dataclasses.replace(pipe.default_settings, top_k=5)


def test_returns_the_requested_uint8_images_and_their_record(pipe):
    samples = pipe(PROMPTS + [""], num_images=2, seed=1, **SETTINGS)
    assert samples.images.shape == (3, 2, 32, 32, 3) and samples.images.dtype == np.uint8
    assert samples.image_ids.shape == (3, 2, 64) and samples.image_ids.dtype == np.int32
    assert samples.image_ids.max() < 32
    np.testing.assert_array_equal(samples.text_ids[0], pipe.seq2seq.tokenizer.encode(PROMPTS[0], 40))
    # The empty prompt is the unconditional caption, as in training.
    np.testing.assert_array_equal(samples.text_ids[2], pipe.seq2seq.empty_text_ids)
    np.testing.assert_array_equal(samples.uncond_text_ids, pipe.seq2seq.empty_text_ids)
    np.testing.assert_array_equal(samples.images.reshape(6, 32, 32, 3), pipe.decode(samples.image_ids.reshape(6, 64)))
    assert samples.grid().shape == (3 * 34 + 2, 2 * 34 + 2, 3)
    records = samples.records()
    assert [r["index"] for r in records] == list(range(6)) and records[5]["prompt"] == ""
    assert records[3]["image_ids"] == samples.image_ids[1, 1].tolist()
    assert {k: records[0][k] for k in SETTINGS} == SETTINGS
    assert len({row.tobytes() for row in samples.image_ids.reshape(6, 64)}) == 6


def test_image_i_is_the_same_whatever_the_batch(pipe):
    prompts = ["a small red circle in the top left", "a blue square"]
    reference = pipe(prompts, num_images=2, seed=5, batch_size=4, **SETTINGS)
    # Batches of 3: the second holds one image and two rows of padding.
    again = pipe(prompts, num_images=2, seed=5, batch_size=3, **SETTINGS)
    np.testing.assert_array_equal(again.image_ids, reference.image_ids)
    np.testing.assert_array_equal(again.images, reference.images)
    # Image i depends on (seed, i): the second prompt alone is sampled at indices 0..1, not 2..3.
    alone = pipe(prompts[1:] * 2, num_images=2, seed=5, **SETTINGS)
    np.testing.assert_array_equal(alone.image_ids[1], reference.image_ids[1])
    assert np.any(alone.image_ids[0] != reference.image_ids[1])
    codes = pipe.generate(np.repeat(reference.text_ids, 2, axis=0), 5, SamplingSettings(**SETTINGS))[0]
    np.testing.assert_array_equal(codes, reference.image_ids.reshape(4, 64))
    assert np.any(pipe(prompts, num_images=2, seed=6, **SETTINGS).image_ids != reference.image_ids)


def test_candidates_keep_the_likeliest_of_the_draws_at_their_indices(pipe):
    settings = SamplingSettings(**SETTINGS)
    prompts = [*PROMPTS, "a blue square"]
    text_ids = pipe.encode_prompts(prompts)[0]
    # Image i of 3 candidates is one of the single draws at indices 3i, 3i+1, 3i+2: the one of highest score.
    singles, _, single_scores, single_draws = pipe.generate(np.repeat(text_ids, 3, axis=0), 7, settings)
    np.testing.assert_array_equal(single_draws, np.arange(9))
    best = np.argmax(single_scores.reshape(3, 3), axis=1) + np.arange(3) * 3
    # Batches of 16 draws hold all 5 images; of 6 draws, 2 images, the last batch one image and one of padding.
    for batch_size in (6, 16):
        chosen = pipe(prompts, num_images=1, seed=7, candidates=3, batch_size=batch_size, **SETTINGS)
        np.testing.assert_array_equal(chosen.image_ids[:, 0], singles[best])
        np.testing.assert_allclose(chosen.scores[:, 0], single_scores[best], rtol=1e-6)
        np.testing.assert_array_equal(chosen.draws[:, 0], best)
        np.testing.assert_array_equal(chosen.images[:, 0], pipe.decode(singles[best]))
    record = chosen.records()[1]
    assert record["candidates"] == 3 and record["score"] == chosen.scores[1, 0] and record["draw"] == best[1]
    # One candidate is the plain draw at index i: prompt 0 at index 0 is the first single draw above.
    plain_codes, _, _, plain_draws = pipe.generate(text_ids, 7, dataclasses.replace(settings, candidates=1))
    np.testing.assert_array_equal(plain_codes[0], singles[0])
    np.testing.assert_array_equal(plain_draws, np.arange(3))


def test_cond_scale_one_is_conditional_only(pipe):
    plain = pipe(PROMPTS, num_images=2, seed=3, **dict(SETTINGS, cond_scale=1.0))
    assert plain.uncond_text_ids is None
    # Guidance against unconditional rows equal to the conditional ones leaves the logits as they are.
    text_ids = np.repeat(plain.text_ids, 2, axis=0)
    guided_by_itself = sampling.sample_image_tokens(
        pipe._graphdef, pipe._state, text_ids, text_ids, 3, np.arange(4), SamplingSettings(**SETTINGS),
        mesh=pipe.mesh, sharding_rules=pipe.seq2seq.config.sharding_rules)
    np.testing.assert_array_equal(np.asarray(guided_by_itself), plain.image_ids.reshape(4, 64))
    assert np.any(pipe(PROMPTS, num_images=2, seed=3, **SETTINGS).image_ids != plain.image_ids)


def test_a_long_prompt_is_truncated_with_a_warning(pipe):
    long_prompt = " ".join(["a small red circle in the top left"] * 10)
    with pytest.warns(UserWarning, match="longer than the model's text_length=40"):
        samples = pipe([long_prompt, PROMPTS[0]], num_images=2, seed=1, **SETTINGS)
    assert samples.truncated == (True, False)
    ids, _ = pipe.seq2seq.tokenizer.encode_with_truncation(long_prompt, 40)
    np.testing.assert_array_equal(samples.text_ids[0], ids)
    assert samples.text_ids[0, -1] == 2  # `</s>` closes the truncated prompt


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_images=0), "num_images=0 must be an integer >= 1"),
    (dict(batch_size=0), "batch_size=0 must be an integer >= 1"),
    (dict(seed=-1), r"seed=-1 must be an integer in \[0, 2\*\*32\)"),
    (dict(top_k=-1), "top_k=-1 must be an integer >= 1"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(temperature=0.0), "temperature=0.0 must be a finite number > 0"),
    (dict(prompts=[]), "prompts must be a non-empty list of str"),
    (dict(prompts=[3]), "prompts must be a non-empty list of str"),
])
def test_bad_requests_fail_before_sampling(pipe, monkeypatch, kwargs, message):
    monkeypatch.setattr(sampling, "sample_image_tokens", lambda *a, **k: pytest.fail("sampled a bad request"))
    prompts = kwargs.pop("prompts", PROMPTS)
    with pytest.raises(ValueError, match=message):
        pipe(prompts, **kwargs)


def _copy_without_checkpoints(workdir, target):
    os.makedirs(target)
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(workdir, name), target)
    return target


def test_bad_work_directories_are_named(sampling_workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "load_seq2seq", lambda *a, **k: pytest.fail("restored a bad work directory"))
    with pytest.raises(FileNotFoundError, match="The seq2seq work directory .*missing.* does not exist"):
        TextToImage.from_workdir(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="work directory of the 'vqgan' trainer, not of a seq2seq run"):
        TextToImage.from_workdir(sampling_workdir["vqgan_workdir"])
    empty = _copy_without_checkpoints(sampling_workdir["workdir"], str(tmp_path / "no_checkpoint"))
    with pytest.raises(FileNotFoundError, match="has no checkpoint in .* yet"):
        TextToImage.from_workdir(empty)
    os.remove(os.path.join(empty, "tokenizer.model"))
    with pytest.raises(FileNotFoundError, match="tokenizer.model does not exist"):
        TextToImage.from_workdir(empty)
    moved = _copy_without_checkpoints(sampling_workdir["workdir"], str(tmp_path / "moved_vqgan"))
    os.symlink(os.path.join(sampling_workdir["workdir"], "checkpoints"), os.path.join(moved, "checkpoints"))
    config = runs.load_config(moved)
    config.vqgan_workdir = "runs/nowhere"
    runs.save_config(config, moved)
    with pytest.raises(FileNotFoundError, match="VQGAN work directory 'runs/nowhere' \\(config.vqgan_workdir of "):
        TextToImage.from_workdir(moved)
    with pytest.raises(FileNotFoundError, match=r"VQGAN work directory '.*gone' \(vqgan_workdir\) does not exist"):
        TextToImage.from_workdir(sampling_workdir["workdir"], vqgan_workdir=str(tmp_path / "gone"))
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        TextToImage.from_workdir(sampling_workdir["workdir"], batch_size=0)


def test_a_vqgan_that_does_not_match_the_model_is_refused_or_flagged(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextToImage(pipe.seq2seq, pipe.vqgan, pipe.mesh)  # the VQGAN the model was trained on
    for field, value in (("grid_size", 4), ("codebook_size", 64)):
        with pytest.raises(ValueError, match="cannot decode the model in .* Use the VQGAN the model was trained on"):
            TextToImage(pipe.seq2seq, dataclasses.replace(pipe.vqgan, **{field: value}), pipe.mesh)
    with pytest.warns(UserWarning, match="image_vocab_size=32 but its VQGAN has 16 codes"):
        TextToImage(pipe.seq2seq, dataclasses.replace(pipe.vqgan, codebook_size=16), pipe.mesh)
    with pytest.warns(UserWarning, match="has other parameters, so its pictures will not match"):
        TextToImage(pipe.seq2seq, dataclasses.replace(pipe.vqgan, fingerprint="another"), pipe.mesh)
