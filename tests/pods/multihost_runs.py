"""Runs train.py as one process with 8 CPU devices or as several processes sharing them (joined over 127.0.0.1,
gloo collectives), and compares what two such runs wrote."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dalle_jax.training import checkpointing
from dalle_jax.training.metrics import read_metrics
from tests.conftest import REPO, subprocess_env

MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
# The VQGAN recipes are data-parallel; on this mesh its 2-process run takes 40% less time than on MESH, whose
# sharded VQGAN gradients tests/test_sharded_gradients.py checks.
DATA_PARALLEL = ["--config.mesh.data=8", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args, workdir, cache, *, processes: int, mesh=MESH) -> None:
    """Runs train.py as `processes` processes sharing 8 CPU devices on `mesh` (flags; by default data=2, fsdp=2,
    tensor=2); fails with their stderr if any fails."""
    command = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *args, *mesh]
    if processes == 1:
        commands = [command]
    else:
        address = f"127.0.0.1:{_free_port()}"
        commands = [command + [f"--coordinator_address={address}", f"--num_processes={processes}",
                               f"--process_id={i}"] for i in range(processes)]
    env = subprocess_env(cache, devices=8 // processes)
    running = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for c in commands]
    try:
        outputs = [p.communicate(timeout=900) for p in running]
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
    for i, (p, (_, err)) in enumerate(zip(running, outputs)):
        assert p.returncode == 0, f"process {i} of {processes} failed:\n{err[-4000:]}"


def _scalars(workdir, key):
    lines = [m for m in read_metrics(workdir) if key in m]
    steps = [m["step"] for m in lines]
    assert len(steps) == len(set(steps)), f"{key} logged more than once per step: {steps}"
    return {m["step"]: m[key] for m in lines}


def assert_same_run(single, multi, keys):
    """Same metrics (each logged once per step, by process 0 alone), checkpoint steps and final test figures."""
    for key in keys:
        a, b = _scalars(single, key), _scalars(multi, key)
        assert sorted(a) == sorted(b) and a, key
        np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=1e-4, err_msg=key)
    assert checkpointing.checkpoint_steps(multi) == checkpointing.checkpoint_steps(single)
    with open(os.path.join(single, "test_metrics.json")) as f, open(os.path.join(multi, "test_metrics.json")) as g:
        a, b = json.load(f), json.load(g)
    # The VQGAN's judge runs on one process only (other processes' reconstructions are not gathered).
    assert set(b) == {k for k in a if not k.startswith("judge_")}
    for key in b:
        assert b[key] == (pytest.approx(a[key], rel=1e-4) if isinstance(a[key], float) else a[key]), key
