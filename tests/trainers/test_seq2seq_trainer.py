"""The seq2seq trainer end to end on the tiny config: stages, learning, metrics, resume, sharding invariance."""
import json
import os

import numpy as np
import pytest

from dalle_jax.configs import shapes_dalle, shapes_vqgan
from dalle_jax import parallel
from dalle_jax.data import text as text_lib, token_records
from dalle_jax import runs
from dalle_jax.training.metrics import read_metrics
from tests.pods import multihost_runs
from tests.conftest import REPO, TINY_SPLITS, once_per_session
from tests.trainers.test_encode_stage import filled_state, save_checkpoint


@pytest.fixture(scope="module")
def vqgan_workdir(tmp_path_factory, shapes_data_dir, compilation_cache):
    """A tiny VQGAN with an 8x8 grid of 32 codes (seeded random parameters: the trainer only needs its codes)."""
    config = shapes_vqgan.get_config("tiny")
    config.data.data_dir = shapes_data_dir
    config.model.ch_mult = (1, 2, 2)

    def build(workdir):
        runs.save_config(config, workdir)
        save_checkpoint(config, workdir, 5, filled_state(config, parallel.make_mesh(config.mesh), seed=0))
        return {}

    return once_per_session(tmp_path_factory, "seq2seq_vqgan", build)[0]


def tiny_config(data_dir, vqgan_workdir):
    config = shapes_dalle.get_config("tiny")
    config.data.data_dir = data_dir
    config.vqgan_workdir = vqgan_workdir
    return config


def train_losses(workdir):
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shapes_data_dir, vqgan_workdir):
    from dalle_jax.trainers import seq2seq_trainer as seq2seq
    return once_per_session(tmp_path_factory, "dalle_full",
                            lambda workdir: seq2seq.train(tiny_config(shapes_data_dir, vqgan_workdir), workdir))


def test_tiny_run_learns_and_records_everything(full_run):
    workdir, final = full_run
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(2, 13, 2))
    assert losses[12] < 0.8 * losses[2]
    lines = read_metrics(workdir)
    evals = [m for m in lines if "eval/loss" in m]
    assert [m["step"] for m in evals] == [6, 12]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
    for m in evals:
        assert 0 <= m["eval/token_accuracy"] <= 1
        assert m["eval/perplexity"] == pytest.approx(np.exp(m["eval/loss"]), rel=1e-6)
    train_line = next(m for m in lines if "train/loss" in m)
    for key in ("train/token_accuracy", "train/grad_norm", "train/blank_captions", "train/steps_per_s",
                "train/tokens_per_s", "train/model_flops_per_step", "train/mfu"):
        assert key in train_line
    assert 0 < train_line["train/mfu"] < 1
    # One sample grid per evaluation: 2 prompts x 2 images of 32x32 with 2-pixel gaps.
    for step in (6, 12):
        from PIL import Image
        grid = np.asarray(Image.open(os.path.join(workdir, "samples", f"eval_samples_{step:07d}.png")))
        assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    assert final["examples"] == TINY_SPLITS["test"]
    with open(os.path.join(workdir, "test_metrics.json")) as f:
        assert json.load(f)["loss"] == pytest.approx(final["loss"])


def test_stages_are_stored_in_the_workdir(full_run):
    workdir, _ = full_run
    tokenizer = text_lib.TextTokenizer(os.path.join(workdir, "tokenizer.model"))
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.decode(tokenizer.encode("A Small RED circle", 16)) == "a small red circle"
    encoded = os.path.join(workdir, "encoded")
    for split, count in TINY_SPLITS.items():
        source = token_records.open_split(encoded, split)
        assert len(source) == count
        assert source[0]["codes"].shape == (64,) and source[0]["codes"].max() < 32
    assert runs.load_config(workdir).trainer == "seq2seq"


def test_interrupted_run_resumes_with_identical_losses(full_run, tmp_path, shapes_data_dir, vqgan_workdir):
    from dalle_jax.trainers import seq2seq_trainer as seq2seq
    workdir = str(tmp_path / "resumed")
    config = tiny_config(shapes_data_dir, vqgan_workdir)
    assert seq2seq.train(config, workdir, stop_after=6) is None
    assert max(train_losses(workdir)) == 6
    final = seq2seq.train(config, workdir)
    np.testing.assert_allclose(list(train_losses(workdir).values()), list(train_losses(full_run[0]).values()),
                               rtol=1e-6)
    assert final["loss"] == pytest.approx(full_run[1]["loss"], rel=1e-6)


def test_user_tokenizer_is_copied_and_a_different_one_refused(full_run, tmp_path, shapes_data_dir, vqgan_workdir):
    from dalle_jax.trainers import text_stage
    config = tiny_config(shapes_data_dir, vqgan_workdir)
    config.text.tokenizer_model = os.path.join(full_run[0], "tokenizer.model")
    workdir = str(tmp_path / "user_tokenizer")
    tokenizer = text_stage.prepare_tokenizer(config, workdir, iter(()))
    with open(tokenizer.model_path, "rb") as a, open(config.text.tokenizer_model, "rb") as b:
        assert a.read() == b.read()
    other = text_lib.train_tokenizer(["a red circle", "a blue square"], 16, str(tmp_path / "other"))
    config.text.tokenizer_model = other
    with pytest.raises(ValueError, match="differs from config.text.tokenizer_model"):
        text_stage.prepare_tokenizer(config, workdir, iter(()))
    config.text.tokenizer_model = ""
    config.model.text_vocab_size = 8
    with pytest.raises(ValueError, match="config.model.text_vocab_size"):
        text_stage.prepare_tokenizer(config, workdir, iter(()))


@pytest.mark.parametrize("field, value, message", [
    ("vqgan_workdir", "", "config.vqgan_workdir is empty"),
    ("model.image_vocab_size", 16, "config.model.image_vocab_size=32"),
    ("model.image_length", 16, "config.model.image_length=64"),
    ("optimizer.accumulation_steps", 3, "accumulation_steps=3"),
    ("model.text_length", 2, "text_length=2"),
    ("data.blank_caption_prob", 1.5, "blank_caption_prob=1.5"),
    ("model.code_features", 7, "set config.model.code_features=25"),
    ("extensions", ("dalle_jax.shapes.no_such_module",), "config.extensions names 'dalle_jax.shapes.no_such_module', "
                                                         "which cannot be imported"),
])
def test_bad_configs_fail_before_any_work(tmp_path, shapes_data_dir, vqgan_workdir, field, value, message):
    from dalle_jax.trainers import seq2seq_trainer as seq2seq
    config = tiny_config(shapes_data_dir, vqgan_workdir)
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message):
        seq2seq.train(config, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_shapes_only_settings_on_another_dataset_fail_before_any_work(tmp_path, shapes_data_dir, vqgan_workdir):
    from dalle_jax.shapes import code_features_stage
    from dalle_jax.trainers import seq2seq_trainer as seq2seq
    config = tiny_config(shapes_data_dir, vqgan_workdir)
    config.model.code_features = 25
    code_features_stage.check_config(config)
    config.data.dataset = "captioned_folder"
    config.data.left_or_above_caption_steps = 0
    with pytest.raises(ValueError, match="config.model.code_features=25 describes codes by the captioned_shapes "
                                         "palette.*set config.model.code_features=0"):
        seq2seq.train(config, str(tmp_path / "bad"))
    config.model.code_features, config.data.left_or_above_caption_steps = 0, 5
    with pytest.raises(ValueError, match="config.data.left_or_above_caption_steps=5 rewords captioned_shapes"):
        seq2seq.train(config, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")


def test_code_features_are_measured_stored_and_loaded_in_the_plain_layout(tmp_path, shapes_data_dir,
                                                                          vqgan_workdir):
    import jax
    from flax import nnx
    from dalle_jax.models import dalle_bart
    from dalle_jax.shapes import code_features_stage
    from dalle_jax.shapes.code_features_bart import CodeFeaturesBart
    from dalle_jax.trainers import seq2seq_trainer as seq2seq, seq2seq_step
    from dalle_jax.training import checkpointing
    config = tiny_config(shapes_data_dir, vqgan_workdir)
    config.model.code_features = 25
    config.num_steps = config.eval_every = config.checkpoint_every = 4
    workdir = str(tmp_path / "featured")
    seq2seq.train(config, workdir)

    setup, _, shardings = seq2seq_step.create(config, parallel.make_mesh(config.mesh), initialize=False)
    abstract = nnx.eval_shape(lambda: CodeFeaturesBart(config.model, rngs=nnx.Rngs(params=0, dropout=0)))
    target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          nnx.state(abstract, nnx.Param).to_pure_dict(), shardings["params"])
    stored = checkpointing.restore_params(workdir, 4, target)
    measured = code_features_stage.measure(config, token_records.open_split(os.path.join(workdir, "encoded"), "train"))
    np.testing.assert_array_equal(stored["decoder"]["code_features"], measured)  # measured once, never trained
    assert measured[:32, :16].max() > 0 and measured[32, -2] == 1  # some code draws foreground; the start row

    loaded = runs.load_seq2seq(workdir)
    assert "code_features" not in loaded.config.model and type(loaded.model()) is dalle_bart.DalleBart
    assert "dalle_jax.shapes.code_features_stage" not in loaded.config.extensions  # the plain model needs none
    text = np.asarray(loaded.tokenizer.encode_batch(["a red circle", "a blue square"], config.model.text_length))
    codes = np.random.default_rng(0).integers(0, 32, size=(2, 64)).astype(np.int32)
    inputs = dalle_bart.teacher_forcing_inputs(jax.numpy.asarray(codes), 32)
    np.testing.assert_allclose(loaded.model()(text, inputs), setup.model(stored)(text, inputs), atol=1e-4, rtol=1e-4)
    rebuilt = seq2seq_step.create(loaded.config, loaded.mesh, initialize=False)[0].model(loaded.params)
    np.testing.assert_allclose(rebuilt(text, inputs), loaded.model()(text, inputs))


def cli_args(data_dir, vqgan_dir):
    return [f"--config=shapes_dalle:tiny", f"--config.data.data_dir={data_dir}",
            f"--config.vqgan_workdir={vqgan_dir}"]


@pytest.fixture(scope="module")
def mesh8_run(tmp_path_factory, shapes_data_dir, vqgan_workdir, compilation_cache):
    """The CLI as one process on an 8-device CPU mesh (data=2, fsdp=2, tensor=2)."""
    workdir = str(tmp_path_factory.mktemp("dalle_mesh8"))
    multihost_runs.train(cli_args(shapes_data_dir, vqgan_workdir), workdir, compilation_cache, processes=1)
    return workdir


def test_eight_device_mesh_matches_one_device(full_run, mesh8_run):
    """The 8-device mesh gives the 1-device run's losses."""
    one, eight = train_losses(full_run[0]), train_losses(mesh8_run)
    assert sorted(eight) == sorted(one)
    np.testing.assert_allclose([eight[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=2e-4)
    evals = {m["step"]: m["eval/loss"] for m in read_metrics(mesh8_run) if "eval/loss" in m}
    reference = {m["step"]: m["eval/loss"] for m in read_metrics(full_run[0]) if "eval/loss" in m}
    np.testing.assert_allclose([evals[s] for s in (6, 12)], [reference[s] for s in (6, 12)], rtol=2e-4)


def test_two_processes_match_one_process_of_eight_devices(mesh8_run, tmp_path, shapes_data_dir, vqgan_workdir,
                                                          compilation_cache):
    """2 processes x 4 CPU devices joined over 127.0.0.1 (gloo): the same losses, evaluations, checkpoints and
    final figures as 1 process with 8 devices, metrics written once (by process 0)."""
    multi = str(tmp_path / "two_processes")
    multihost_runs.train(cli_args(shapes_data_dir, vqgan_workdir), multi, compilation_cache, processes=2)
    multihost_runs.assert_same_run(mesh8_run, multi, ["train/loss", "train/token_accuracy", "eval/loss"])
