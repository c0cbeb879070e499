"""A tiny DalleBart whose work directory, dataset and VQGAN live in a GCS bucket (an emulator on 127.0.0.1), trained by
two processes that share nothing on disk (each its own HOME and scratch directory), killed with SIGKILL after its
first checkpoint and resumed by two fresh processes: it gives the losses of a local one-process run on the same two
devices. Sampling reads the bucket's run and writes into the bucket (export from a bucket: test_bucket_runs.py). A
credential planted in every process's environment, and one written into a URL, appear in no output, no object in the
bucket, no scratch file."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.storage.conftest import BUCKET, COMMITTED, losses, machine_env, run, wait_for
from tests.storage.gcs_server import free_port

# Two devices, data-parallel: summing two gradients is exact in either order, so the runs agree to the bit.
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
OVERRIDES = ["--config.log_every=1", "--config.checkpoint_every=4", "--config.eval_every=12"]
SECRET = "planted-credential-5e1c0a"
CREDENTIALS = dict(AWS_ACCESS_KEY_ID=SECRET, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=SECRET)
PROMPT = ["--prompt=a red circle", "--num_images=2", "--seed=3"]


def _train(workdir, data_dir, vqgan_dir):
    return [sys.executable, os.path.join(REPO, "train.py"), "--config=shapes_dalle:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.vqgan_workdir={vqgan_dir}", *MESH, *OVERRIDES]


def _sample(workdir, out):
    return [sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={workdir}", f"--out={out}", *PROMPT]


@pytest.fixture(scope="module")
def vqgan_dirs(tmp_path_factory, shapes_data_dir, gcs):
    """One VQGAN (seeded parameters: the trainer needs only its codes), on local disk and in the bucket."""
    from dalle_jax import parallel, runs, storage
    from dalle_jax.configs import shapes_vqgan
    from tests.trainers.test_encode_stage import filled_state, save_checkpoint
    config = shapes_vqgan.get_config("tiny")
    config.data.data_dir = shapes_data_dir
    config.model.ch_mult = (1, 2, 2)
    local = str(tmp_path_factory.mktemp("vqgan"))
    runs.save_config(config, local)
    save_checkpoint(config, local, 5, filled_state(config, parallel.make_mesh(config.mesh), seed=0))
    bucket = f"gs://{BUCKET}/vqgan"
    storage.upload_tree_last(local, bucket, last="config.json")
    return local, bucket


def _start_two(command, cache, gcs, homes):
    """The run's two processes, each on a 'machine' of its own, joined over 127.0.0.1."""
    address = f"127.0.0.1:{free_port()}"
    return [subprocess.Popen(command + [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                             cwd=REPO, env=machine_env(cache, gcs, home, **CREDENTIALS),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, home in enumerate(homes)]


def _finish(processes) -> list[str]:
    outputs = [p.communicate(timeout=600) for p in processes]
    for i, (p, (_, err)) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{err[-4000:]}"
    return [out + err for out, err in outputs]


def _files_holding(secret: str, root: str) -> list[str]:
    from dalle_jax import storage
    found = []
    for directory, _, files in storage.walk(root):
        for name in files:
            path = storage.join(directory, name)
            if secret.encode() in storage.read_bytes(path):
                found.append(path)
    return found


def test_a_two_process_bucket_run_killed_and_resumed_matches_a_local_run(gcs, vqgan_dirs, shapes_data_dir, tmp_path,
                                                                        compilation_cache):
    from PIL import Image
    from dalle_jax import storage
    from dalle_jax.training import checkpointing
    local_vqgan, bucket_vqgan = vqgan_dirs
    local = str(tmp_path / "local_run")
    done, local_seconds = run(_train(local, shapes_data_dir, local_vqgan),
                              machine_env(compilation_cache, None, tmp_path / "local_home", devices=2))
    assert done.returncode == 0, done.stderr[-4000:]

    workdir, data_dir = f"gs://{BUCKET}/dalle", f"gs://{BUCKET}/tfds"
    command = _train(workdir, data_dir, bucket_vqgan)
    uploaded = gcs.proxy.uploaded_bytes
    first = _start_two(command, compilation_cache, gcs, [tmp_path / "a0", tmp_path / "a1"])
    wait_for(storage.join(workdir, "checkpoints", "4", COMMITTED), first)
    for p in first:
        p.kill()
    killed_outputs = [out + err for out, err in (p.communicate(timeout=60) for p in first)]
    assert [p.returncode for p in first] == [-signal.SIGKILL] * 2
    killed_at = max(losses(workdir))
    assert killed_at < 12
    # Two fresh machines resume it: the dataset and the image tokens are staged from the bucket again.
    outputs = _finish(_start_two(command, compilation_cache, gcs, [tmp_path / "b0", tmp_path / "b1"]))
    for output in outputs:
        assert "Resuming from step 4" in output and "Staged dataset" in output and "image-token shard" in output
    assert losses(workdir) == losses(local) and sorted(losses(local)) == list(range(1, 13))
    assert checkpointing.checkpoint_steps(workdir) == checkpointing.checkpoint_steps(local)
    for name in ("config.json", "test_metrics.json", "metrics.jsonl", "tokenizer.model", "encoded/manifest.json"):
        assert storage.isfile(storage.join(workdir, name)), name
    uploaded = gcs.proxy.uploaded_bytes - uploaded

    # Sampling reads the bucket's run and writes its grid into the bucket: the local run's pixels, to the bit.
    env = machine_env(compilation_cache, gcs, tmp_path / "sampler", **CREDENTIALS)
    grid = f"gs://{BUCKET}/grid.png"
    sampled, _ = run(_sample(workdir, grid), env)
    assert sampled.returncode == 0, sampled.stderr[-4000:]
    reference, _ = run(_sample(local, str(tmp_path / "grid.png")), env)
    assert reference.returncode == 0, reference.stderr[-4000:]
    with storage.open(grid, "rb") as f:
        np.testing.assert_array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "grid.png")))

    # A URL that carries a credential is refused without showing it (the check sits in dalle_jax.storage, which every
    # path goes through).
    leaked_url = f"gs://reader:{SECRET}@{BUCKET}/elsewhere"
    refused, _ = run(_sample(leaked_url, str(tmp_path / "never.png")), env)
    assert refused.returncode != 0
    assert f"gs://{BUCKET}/elsewhere: a bucket URL takes no" in refused.stderr, refused.stderr[-4000:]
    texts = killed_outputs + outputs + [done.stdout + done.stderr] + [
        p.stdout + p.stderr for p in (sampled, reference, refused)]
    assert not [t for t in texts if SECRET in t]
    assert _files_holding(SECRET, f"gs://{BUCKET}") == []
    assert _files_holding(SECRET, str(tmp_path)) == []
    print(f"\nbucket DalleBart run: 2 processes killed after step {killed_at}, 2 fresh ones resumed; 12 steps' "
          f"train/loss equal to the local run's ({local_seconds:.1f} s); {uploaded} bytes uploaded")
