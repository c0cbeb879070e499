"""The caption-model trainer on the tiny config: its record of the seq2seq run, resume, batches, data, loading."""
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from dalle_jax.configs import shapes_captioner
from dalle_jax import parallel
from dalle_jax import runs
from dalle_jax.data import shapes_scene, text as text_lib, token_records
from dalle_jax.shapes import code_features
from dalle_jax.trainers import captioner_trainer as captioner, captioner_data, captioner_step
from dalle_jax.shapes import code_features_stage
from dalle_jax.training import checkpointing
from dalle_jax.training.metrics import read_metrics
from tests.conftest import TINY_SPLITS, once_per_session
from tests.inference.test_text_to_image import sampling_workdir


def tiny_config(seq2seq_workdir: str):
    config = shapes_captioner.get_config("tiny")
    config.seq2seq_workdir = seq2seq_workdir
    return config


@pytest.fixture(scope="module")
def captioner_run(tmp_path_factory, sampling_workdir):  # noqa: F811
    """(work directory, test figures) of the tiny captioner trained for the shared seq2seq run, once per session
    (tests/inference/test_reranked_sampling.py reranks with it). It does not register itself in that run, which the
    other tests sample without a reranker."""
    config = tiny_config(sampling_workdir["workdir"])
    return once_per_session(tmp_path_factory, "captioner",
                            lambda workdir: captioner.train(config, workdir, register=False))


@pytest.fixture(scope="module")
def pixel_captioner_run(tmp_path_factory, sampling_workdir):  # noqa: F811
    """The same, reading decoded pictures instead of codes."""
    config = tiny_config(sampling_workdir["workdir"])
    config.model.reads = "pixels"
    return once_per_session(tmp_path_factory, "pixel_captioner",
                            lambda workdir: captioner.train(config, workdir, register=False))


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(shapes_captioner.get_config("tiny").mesh)


def params_of(workdir, mesh):
    return jax.device_get(runs.load_reranker(workdir, mesh).params)


def test_the_run_records_the_seq2seq_run_it_serves(captioner_run, sampling_workdir):  # noqa: F811
    workdir, final = captioner_run
    seq2seq_dir = sampling_workdir["workdir"]
    config = runs.load_config(workdir)
    assert config.trainer == "captioner"
    assert config.model.text_length == runs.read_config(seq2seq_dir, "seq2seq").model.text_length == 40
    assert config.model.vocab_size == runs.load_tokenizer(seq2seq_dir).vocab_size
    assert config.model.image_size == 32
    seq2seq_config = runs.read_config(seq2seq_dir, "seq2seq")
    assert config.model.reads == "code_features"
    assert (config.model.image_length, config.model.image_vocab_size) == (
        seq2seq_config.model.image_length, seq2seq_config.model.image_vocab_size)
    assert config.model.code_features == code_features.palette_width(len(shapes_scene.COLORS))
    assert config.tokenizer_sha256 == runs.tokenizer_fingerprint(seq2seq_dir)
    assert len(config.tokenizer_sha256) == 64
    with open(os.path.join(workdir, "test_metrics.json")) as f:
        written = json.load(f)
    assert written["step"] == config.num_steps == 6
    assert math.isfinite(written["loss"]) and written["loss"] > 0
    assert written["loss"] == pytest.approx(final["loss"])
    assert written["examples"] == TINY_SPLITS["test"]
    lines = read_metrics(workdir)
    assert [m["step"] for m in lines if "eval/loss" in m] == [3, 6]
    assert all(math.isfinite(m["train/loss"]) for m in lines if "train/loss" in m)
    assert checkpointing.checkpoint_steps(workdir) == [3, 6]


def test_the_code_features_are_measured_on_the_run_images_and_stay_fixed(captioner_run, sampling_workdir,  # noqa: F811
                                                                        mesh):
    seq2seq_dir = sampling_workdir["workdir"]
    records = token_records.open_split(os.path.join(seq2seq_dir, token_records.ENCODED_DIR), "train")
    measured = code_features_stage.measure(runs.read_config(seq2seq_dir, "seq2seq"), records)
    trained = params_of(captioner_run[0], mesh)["code_features"]
    np.testing.assert_array_equal(trained, measured)
    assert np.abs(measured).sum() > 0


def test_a_code_reader_for_another_dataset_is_refused(sampling_workdir, mesh):  # noqa: F811
    seq2seq_dir = sampling_workdir["workdir"]
    seq2seq_config = runs.read_config(seq2seq_dir, "seq2seq")
    seq2seq_config.data.dataset = "captioned_folder"
    tokenizer = runs.load_tokenizer(seq2seq_dir)
    vqgan = runs.load_vqgan(sampling_workdir["vqgan_workdir"], mesh)
    with pytest.raises(ValueError, match="reads='code_features' describes codes by the captioned_shapes palette"):
        captioner.with_seq2seq_shapes(tiny_config(seq2seq_dir), seq2seq_config, tokenizer, vqgan)
    pixels = tiny_config(seq2seq_dir)
    pixels.model.reads = "pixels"
    assert captioner.with_seq2seq_shapes(pixels, seq2seq_config, tokenizer, vqgan).model.code_features == 0
    without_extension = tiny_config(seq2seq_dir)
    without_extension.extensions = ()
    with pytest.raises(ValueError, match="reads='code_features' needs an extension that measures"):
        captioner.with_seq2seq_shapes(without_extension, seq2seq_config, tokenizer, vqgan)


def test_a_resumed_run_ends_where_an_unbroken_one_does_and_then_registers(captioner_run, sampling_workdir,  # noqa: F811
                                                                          tmp_path, mesh):
    # A copy of the shared seq2seq run, which the registration changes.
    seq2seq_dir = str(tmp_path / "dalle")
    shutil.copytree(sampling_workdir["workdir"], seq2seq_dir)
    registration = os.path.join(seq2seq_dir, runs.RERANKER_FILE)
    workdir = str(tmp_path / "resumed")
    config = tiny_config(seq2seq_dir)
    assert captioner.train(config, workdir, stop_after=3) is None
    assert checkpointing.checkpoint_steps(workdir)[-1] == 3
    assert not os.path.exists(os.path.join(workdir, "test_metrics.json"))
    assert not os.path.exists(registration)  # a half-trained reranker is not the run's
    stopped = params_of(workdir, mesh)
    final = captioner.train(config, workdir)
    resumed, unbroken = params_of(workdir, mesh), params_of(captioner_run[0], mesh)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), resumed, unbroken)
    # The last three steps moved the parameters, so matching the unbroken run is not matching step 3.
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(stopped), jax.tree.leaves(resumed)))
    assert final["loss"] == pytest.approx(captioner_run[1]["loss"], rel=1e-6)
    # Each step's training figures were written once.
    steps = [m["step"] for m in read_metrics(workdir) if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    # Finished, it is the run's reranker, named relative to the run.
    with open(registration) as f:
        assert json.load(f)["workdir"] == os.path.join("..", "resumed")
    assert runs.registered_reranker(seq2seq_dir) == workdir
    assert not os.path.exists(os.path.join(sampling_workdir["workdir"], runs.RERANKER_FILE))


def synthetic_pictures(count=10, captions=3):
    """Image r is filled with r; caption c of image r is [r, c] in its first two ids. Image r has r % 3 + 1 of its
    rows filled with distinct captions."""
    ids = np.zeros((count, captions, 4), np.int32)
    ids[..., 0] = np.arange(count)[:, None]
    ids[..., 1] = np.arange(captions)[None, :]
    return captioner_data.CaptionedPictures(
        images=np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None, None], (count, 2, 2, 3)).copy(),
        captions=ids, caption_counts=np.arange(count, dtype=np.int32) % 3 + 1,
        twins=np.zeros((count, 1, 4), np.int32), twin_rows=np.zeros((count, 1), bool))


def test_train_batches_follow_from_seed_and_step_alone():
    data = synthetic_pictures()
    batch = captioner_data.train_batch(data, 0, 5, 16)
    assert batch["images"].shape == (16, 2, 2, 3) and batch["text_ids"].shape == (16, 4)
    again = captioner_data.train_batch(data, 0, 5, 16)
    for key in ("images", "text_ids"):
        np.testing.assert_array_equal(again[key], batch[key])
    assert not np.array_equal(captioner_data.train_batch(data, 0, 6, 16)["text_ids"], batch["text_ids"])
    assert not np.array_equal(captioner_data.train_batch(data, 1, 5, 16)["text_ids"], batch["text_ids"])
    # Each row pairs an image with one of its own captions, never a repeated filler row.
    rows = batch["images"][:, 0, 0, 0]
    np.testing.assert_array_equal(batch["text_ids"][:, 0], rows)
    assert np.all(batch["text_ids"][:, 1] < data.caption_counts[rows])
    many = captioner_data.train_batch(data, 0, 7, 400)
    assert len({tuple(row[:2]) for row in many["text_ids"]}) == data.caption_counts.sum()


def test_load_split_without_a_decoder_keeps_the_codes(sampling_workdir):  # noqa: F811
    seq2seq_dir = sampling_workdir["workdir"]
    encoded = os.path.join(seq2seq_dir, token_records.ENCODED_DIR)
    data = captioner_data.load_split(encoded, "validation", None, runs.load_tokenizer(seq2seq_dir), 40,
                                     max_examples=5, progress=False)
    records = token_records.open_split(encoded, "validation")
    np.testing.assert_array_equal(data.images, np.stack([records[i]["codes"] for i in range(5)]))
    assert data.images.dtype == np.int32


def test_load_split_decodes_the_run_records_and_tokenizes_their_captions(sampling_workdir, mesh):  # noqa: F811
    seq2seq_dir = sampling_workdir["workdir"]
    encoded = os.path.join(seq2seq_dir, token_records.ENCODED_DIR)
    tokenizer = runs.load_tokenizer(seq2seq_dir)
    vqgan = runs.load_vqgan(sampling_workdir["vqgan_workdir"], mesh)
    decode = captioner_data.decode_fn(vqgan)
    data = captioner_data.load_split(encoded, "validation", decode, tokenizer, 40, max_examples=6, batch_size=3,
                                     progress=False)
    records = token_records.open_split(encoded, "validation")
    assert len(data) == 6 and data.images.shape == (6, 32, 32, 3) and data.images.dtype == np.uint8
    codes = np.stack([records[i]["codes"] for i in range(6)])
    np.testing.assert_array_equal(data.images, np.concatenate([decode(codes[:3]), decode(codes[3:])]))
    # Different codes decode to different pictures (the random VQGAN gives several records the same codes).
    assert len({row.tobytes() for row in data.images}) == len({row.tobytes() for row in codes}) > 1
    for i in range(6):
        texts = list(records[i]["captions"])
        assert data.caption_counts[i] == len(texts)
        np.testing.assert_array_equal(data.captions[i, :len(texts)], tokenizer.encode_batch(texts, 40))
        # Rows past an image's own captions repeat its first.
        for row in data.captions[i, len(texts):]:
            np.testing.assert_array_equal(row, data.captions[i, 0])
        assert np.all(data.twins[i][~data.twin_rows[i]] == text_lib.PAD_ID)
    with pytest.raises(FileNotFoundError, match="holds no encoded records"):
        captioner_data.load_split(sampling_workdir["vqgan_workdir"], "train", decode, tokenizer, 40)


def test_caption_loss_is_the_mean_negative_log_likelihood_per_token(captioner_run, mesh):
    loaded = runs.load_reranker(captioner_run[0], mesh)
    model = loaded.model()
    # It reads codes, as the sampler draws them.
    images = np.random.default_rng(0).integers(0, loaded.config.model.image_vocab_size,
                                               (2, loaded.config.model.image_length), dtype=np.int32)
    ids = np.full((2, 40), text_lib.PAD_ID, np.int32)
    ids[0, :4] = [text_lib.BOS_ID, 5, 6, text_lib.EOS_ID]
    ids[1, :7] = [text_lib.BOS_ID, 7, 8, 9, 10, 11, text_lib.EOS_ID]
    loss, accuracy, (token_log_probs, real) = jax.jit(lambda i, t: (
        *captioner_step.caption_loss(model, i, t), model.token_log_probs(model.encode_images(i), t)))(images, ids)
    token_log_probs, real = np.asarray(token_log_probs), np.asarray(real)
    # 3 + 6 scored tokens: a mean per token, not per caption.
    assert real.sum() == 9
    assert float(loss) == pytest.approx(-token_log_probs[real].sum() / 9, rel=1e-5)
    assert float(accuracy) == pytest.approx((token_log_probs[real] > np.log(0.5)).sum() / 9)


def test_an_empty_seq2seq_workdir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="seq2seq_workdir is empty"):
        captioner.train(tiny_config(""), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("field, value, message", [
    ("model.reads", "captions", "reads='captions'; use one of"),
    ("eval_batch_size", 32, "eval_batch_size=32 is larger than config.eval_examples=16"),
    ("train_examples", 0, "train_examples=0"),
])
def test_bad_configs_fail_before_any_work(sampling_workdir, tmp_path, field, value, message):  # noqa: F811
    config = tiny_config(sampling_workdir["workdir"])
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message):
        captioner.train(config, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")


def test_load_captioner_refuses_what_is_not_a_trained_captioner(captioner_run, sampling_workdir, tmp_path,  # noqa: F811
                                                                mesh):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runs.load_reranker(str(tmp_path / "missing"), mesh)
    with pytest.raises(ValueError, match="'vqgan' trainer"):
        runs.load_reranker(sampling_workdir["vqgan_workdir"], mesh)
    with pytest.raises(ValueError, match="'seq2seq' trainer"):
        runs.load_reranker(sampling_workdir["workdir"], mesh)
    fresh = str(tmp_path / "fresh")
    runs.save_config(runs.load_config(captioner_run[0]), fresh)
    with pytest.raises(FileNotFoundError, match="has no checkpoint in .* yet"):
        runs.load_reranker(fresh, mesh)
    loaded = runs.load_reranker(captioner_run[0], mesh, step=3)
    assert loaded.step == 3 and loaded.workdir == os.path.abspath(captioner_run[0])
    with pytest.raises(ValueError, match="no checkpoint of step 4"):
        runs.load_reranker(captioner_run[0], mesh, step=4)
