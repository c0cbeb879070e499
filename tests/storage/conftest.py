"""What the bucket tests share: one GCS emulator per test module, and processes that share nothing on disk."""
import os
import subprocess
import time

import pytest

from tests.conftest import REPO, subprocess_env
from tests.storage.gcs_server import GcsServer

BUCKET = "runs"
# The file orbax writes last into a checkpoint in a bucket (which has no rename): the checkpoint is complete.
COMMITTED = "commit_success.txt"


@pytest.fixture(scope="module")
def gcs():
    server = GcsServer(BUCKET)
    saved = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())  # for this process's reads of the bucket (dalle_jax.storage)
    yield server
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    server.close()


def machine_env(cache, gcs, home, devices: int = 1, **extra) -> dict:
    """The environment of a process on a machine of its own: its own HOME and scratch directory."""
    os.makedirs(home, exist_ok=True)
    env = dict(subprocess_env(cache, devices=devices), HOME=str(home),
               DALLE_JAX_SCRATCH=os.path.join(home, "scratch"), **extra)
    return dict(env, **gcs.env()) if gcs else env


def run(command, env):
    """(finished process, seconds) of `command` run from the repository root."""
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return done, time.monotonic() - started


def losses(workdir) -> dict:
    from dalle_jax.training.metrics import read_metrics
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def wait_for(path, processes, seconds=300) -> None:
    """Waits until `path` exists in the bucket; fails with a process's stderr if one ends first."""
    from dalle_jax import storage
    started = time.monotonic()
    while not storage.exists(path):
        for p in processes:
            assert p.poll() is None, f"a process ended before {path} appeared:\n{p.stderr.read()[-4000:]}"
        assert time.monotonic() - started < seconds, f"no {path} after {seconds} s"
        time.sleep(0.2)
