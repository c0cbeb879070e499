"""Runs whose work directory and dataset live in a GCS bucket (an emulator on 127.0.0.1, tests/storage/gcs_server):
a tiny VQGAN killed with SIGKILL and resumed gives an uninterrupted local run's losses; a write the bucket refuses
mid-checkpoint fails the run with the reason and leaves the previous checkpoint restorable; export reads the bucket's
run and writes to the bucket. Every process has its own scratch directory and HOME: nothing is shared on disk."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.storage.conftest import BUCKET, losses as _losses, machine_env, run as _run, wait_for

OVERRIDES = ["--config.log_every=1", "--config.eval_every=12", "--config.checkpoint_every=4"]


def _command(workdir, data_dir, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"), "--config=shapes_vqgan:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *OVERRIDES, *extra]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, shapes_data_dir, compilation_cache):
    root = tmp_path_factory.mktemp("local")
    done, seconds = _run(_command(str(root / "run"), shapes_data_dir),
                         machine_env(compilation_cache, None, root / "home"))
    assert done.returncode == 0, done.stderr[-4000:]
    return str(root / "run"), seconds


def test_a_bucket_run_killed_and_resumed_matches_a_local_run(gcs, local_run, tmp_path, compilation_cache):
    from dalle_jax import storage
    from dalle_jax.training import checkpointing
    workdir, data_dir = f"gs://{BUCKET}/vqgan", f"gs://{BUCKET}/tfds"
    env = machine_env(compilation_cache, gcs, tmp_path / "home_a")
    uploaded, started = gcs.proxy.uploaded_bytes, time.monotonic()
    process = subprocess.Popen(_command(workdir, data_dir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for(storage.join(workdir, "checkpoints", "4", "_CHECKPOINT_METADATA"), [process])
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = max(_losses(workdir))
    # A fresh machine resumes it: another HOME and scratch directory, so the dataset is staged from the bucket again.
    done, resumed_seconds = _run(_command(workdir, data_dir), machine_env(compilation_cache, gcs, tmp_path / "home_b"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Resuming from step" in done.stderr and "Staged dataset" in done.stderr
    local, local_seconds = local_run
    assert _losses(workdir) == _losses(local) and len(_losses(local)) == 12
    assert checkpointing.checkpoint_steps(workdir) == checkpointing.checkpoint_steps(local)
    for name in ("config.json", "test_metrics.json", "metrics.jsonl"):
        assert storage.isfile(storage.join(workdir, name)), name
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(workdir))
    assert storage.listdir(storage.join(workdir, "samples"))
    bucket_seconds = time.monotonic() - started

    out = f"gs://{BUCKET}/exported"
    export, _ = _run([sys.executable, "-m", "dalle_jax.interop.export", f"--workdir={workdir}",
                      "--format=safetensors", f"--out={out}"], env)
    assert export.returncode == 0, export.stderr[-4000:]
    assert storage.getsize(storage.join(out, "model.safetensors")) > 10_000
    print(f"\nbucket VQGAN run: killed after step {killed_at}, resumed; 12 steps' train/loss equal to the local "
          f"run's; {gcs.proxy.uploaded_bytes - uploaded} bytes uploaded; {bucket_seconds:.1f} s (two processes, "
          f"the second resuming) against {local_seconds:.1f} s locally")


def test_a_refused_checkpoint_write_fails_the_run_and_keeps_the_previous_checkpoint(gcs, local_run, tmp_path,
                                                                                    compilation_cache):
    from dalle_jax import storage
    from dalle_jax.training import checkpointing
    workdir, data_dir = f"gs://{BUCKET}/refused", f"gs://{BUCKET}/tfds"
    env = machine_env(compilation_cache, gcs, tmp_path / "home")
    gcs.refuse("refused/checkpoints/8")
    try:
        done, _ = _run(_command(workdir, data_dir), env)
        refusals = gcs.proxy.refusals
    finally:
        gcs.refuse(None)
    assert done.returncode != 0 and refusals > 0
    assert "403" in done.stderr and "refused/checkpoints/8" in done.stderr, done.stderr[-4000:]
    assert checkpointing.checkpoint_steps(workdir)[-1] == 4  # step 8's is not listed: never committed
    done, _ = _run(_command(workdir, data_dir), env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Resuming from step 4" in done.stderr
    assert _losses(workdir) == _losses(local_run[0])
    assert storage.isfile(storage.join(workdir, "test_metrics.json"))
