"""Runs whose work directory and dataset live in a GCS bucket (an emulator on 127.0.0.1, tests/storage/gcs_server):
a tiny VQGAN killed with SIGKILL, then failing on a write the bucket refuses mid-checkpoint (with the reason, the
previous checkpoint left restorable), resumes to an uninterrupted local run's losses; export reads the bucket's run
and writes to the bucket. Every process has its own scratch directory and HOME: nothing is shared on disk."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.storage.conftest import BUCKET, COMMITTED, losses as _losses, machine_env, run as _run, wait_for

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


def test_a_bucket_run_killed_then_refused_a_write_resumes_to_a_local_runs_losses(gcs, local_run, tmp_path,
                                                                                 compilation_cache):
    """Killed with SIGKILL after its step-4 checkpoint; resumed on a fresh machine, where the bucket refuses every
    write of checkpoint 8 (the run fails naming it, and step 8 is never listed); resumed again, it ends with the
    uninterrupted local run's losses. Export then reads the bucket's run and writes into the bucket."""
    from dalle_jax import storage
    from dalle_jax.training import checkpointing
    workdir, data_dir = f"gs://{BUCKET}/vqgan", f"gs://{BUCKET}/tfds"
    uploaded, started = gcs.proxy.uploaded_bytes, time.monotonic()
    process = subprocess.Popen(_command(workdir, data_dir), cwd=REPO,
                               env=machine_env(compilation_cache, gcs, tmp_path / "home_a"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(storage.join(workdir, "checkpoints", "4", COMMITTED), [process])
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = max(_losses(workdir))

    # A fresh machine (another HOME and scratch directory) resumes it and stages the dataset from the bucket again;
    # the bucket refuses checkpoint 8.
    env = machine_env(compilation_cache, gcs, tmp_path / "home_b")
    gcs.refuse("vqgan/checkpoints/8")
    try:
        refused, _ = _run(_command(workdir, data_dir), env)
        refusals = gcs.proxy.refusals
    finally:
        gcs.refuse(None)
    assert refused.returncode != 0 and refusals > 0
    for line in ("Resuming from step 4", "Staged dataset"):
        assert line in refused.stderr, refused.stderr[-4000:]
    # tensorstore (the state) reports the status, gcsfs (the data iterator's position) its name: whichever write
    # came first.
    assert ("403" in refused.stderr or "Forbidden" in refused.stderr) and "vqgan/checkpoints/8" in refused.stderr, \
        refused.stderr[-4000:]
    assert checkpointing.checkpoint_steps(workdir)[-1] == 4  # step 8's is not listed: never committed

    done, _ = _run(_command(workdir, data_dir), env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Resuming from step 4" in done.stderr
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
    print(f"\nbucket VQGAN run: killed after step {killed_at}, refused at step 8, resumed; 12 steps' train/loss "
          f"equal to the local run's; {gcs.proxy.uploaded_bytes - uploaded} bytes uploaded; {bucket_seconds:.1f} s "
          f"(three processes) against {local_seconds:.1f} s locally")
