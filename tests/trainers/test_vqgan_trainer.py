"""The VQGAN trainer end to end on the tiny config: learning, metrics, resume, and sharding invariance."""
import json
import os

import numpy as np
import pytest

from dalle_jax.configs import shapes_vqgan
from dalle_jax.training.metrics import read_metrics
from tests.pods import multihost_runs
from tests.conftest import REPO, TINY_SPLITS, once_per_session


def tiny_config(data_dir):
    config = shapes_vqgan.get_config("tiny")
    config.data.data_dir = data_dir
    return config


def train_losses(workdir):
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shapes_data_dir, compilation_cache):
    from dalle_jax.trainers import vqgan_trainer as vqgan
    return once_per_session(tmp_path_factory, "vqgan_full",
                            lambda workdir: vqgan.train(tiny_config(shapes_data_dir), workdir))


def test_tiny_run_learns_and_records_everything(full_run):
    workdir, final = full_run
    assert sorted(train_losses(workdir)) == list(range(2, 13, 2))
    lines = read_metrics(workdir)
    reconstruction = [m["train/reconstruction"] for m in lines if "train/reconstruction" in m]
    assert reconstruction[-1] < 0.6 * reconstruction[0]
    evals = [m for m in lines if "eval/psnr" in m]
    assert [m["step"] for m in evals] == [6, 12]
    for key in ("eval/codebook_usage", "eval/codebook_perplexity", "eval/reconstruction"):
        assert all(key in m for m in evals)
    # Usage is a count of codes over 32; perplexity can never exceed the number of codes in use.
    used = evals[-1]["eval/codebook_usage"] * 32
    assert used == round(used) and used >= 1
    assert 1 <= evals[-1]["eval/codebook_perplexity"] <= used + 1e-4
    train_line = next(m for m in lines if "train/loss" in m)
    for key in ("train/reconstruction", "train/codebook", "train/commitment", "train/psnr", "train/steps_per_s",
                "train/images_per_s"):
        assert key in train_line
    # The GAN turns on at disc_start=6: its weight is zero before and positive after.
    gan = {m["step"]: m["train/gan_weight"] for m in lines if "train/gan_weight" in m}
    assert gan[4] == 0 and gan[12] > 0
    # Codes unused for a few steps count as dead and are restarted (every 4 steps), so the resume test below also
    # depends on the restored usage EMA.
    assert max(m["train/dead_codes"] for m in lines if "train/dead_codes" in m) > 0
    assert final["examples"] == TINY_SPLITS["test"]
    # Every test image is judged, and an image is correct only when each of its judged attributes is.
    assert final["judge_count"] == TINY_SPLITS["test"]
    per_attribute = [v for k, v in final.items() if k.startswith("judge_") and k not in ("judge_correct",
                                                                                         "judge_count")]
    assert per_attribute and final["judge_correct"] <= min(per_attribute)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["codebook_size"] == 32
    assert max(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()) == 12
    assert any(name.startswith("eval_reconstructions_") for name in os.listdir(os.path.join(workdir, "samples")))


def test_interrupted_run_resumes_with_identical_losses(full_run, tmp_path, shapes_data_dir):
    from dalle_jax.trainers import vqgan_trainer as vqgan
    workdir = str(tmp_path / "resumed")
    # Stops at step 6, between the regular checkpoints at 4 and 8: the stop writes one of its own.
    assert vqgan.train(tiny_config(shapes_data_dir), workdir, stop_after=6) is None
    assert max(train_losses(workdir)) == 6
    final = vqgan.train(tiny_config(shapes_data_dir), workdir)
    assert train_losses(workdir) == train_losses(full_run[0])
    assert final["psnr"] == full_run[1]["psnr"]


@pytest.fixture(scope="module")
def mesh8_run(tmp_path_factory, shapes_data_dir, compilation_cache):
    """The CLI as one process on an 8-device CPU mesh, data-parallel as the VQGAN recipes are."""
    workdir = str(tmp_path_factory.mktemp("vqgan_mesh8"))
    multihost_runs.train(cli_args(shapes_data_dir), workdir, compilation_cache, processes=1,
                         mesh=multihost_runs.DATA_PARALLEL)
    return workdir


def cli_args(data_dir):
    return [f"--config=shapes_vqgan:tiny", f"--config.data.data_dir={data_dir}"]


def test_eight_device_mesh_matches_one_device(full_run, mesh8_run):
    sharded, single = train_losses(mesh8_run), train_losses(full_run[0])
    assert sorted(sharded) == sorted(single)
    np.testing.assert_allclose([sharded[s] for s in sorted(single)], [single[s] for s in sorted(single)],
                               rtol=2e-4)


def test_two_processes_match_one_process_of_eight_devices(mesh8_run, tmp_path, shapes_data_dir, compilation_cache):
    """2 processes x 4 CPU devices joined over 127.0.0.1 (gloo): the same losses, evaluations, checkpoints and
    final figures as 1 process with 8 devices, metrics written once (by process 0)."""
    multi = str(tmp_path / "two_processes")
    multihost_runs.train(cli_args(shapes_data_dir), multi, compilation_cache, processes=2,
                         mesh=multihost_runs.DATA_PARALLEL)
    multihost_runs.assert_same_run(mesh8_run, multi, ["train/loss", "train/psnr", "eval/psnr"])
