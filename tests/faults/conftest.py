"""One uninterrupted tiny VQGAN run that the fault tests compare their interrupted, resumed runs against."""
import os
import subprocess
import sys
import time

import pytest

from dalle_jax.configs import shapes_vqgan
from dalle_jax.training.metrics import read_metrics
from tests.conftest import REPO, subprocess_env

# Every step logged, one evaluation (at the end), checkpoints every 4 steps of 12.
OVERRIDES = dict(log_every=1, eval_every=12, checkpoint_every=4)


def fault_config(data_dir, **overrides):
    config = shapes_vqgan.get_config("tiny")
    config.data.data_dir = data_dir
    for key, value in {**OVERRIDES, **overrides}.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


def cli_overrides(data_dir) -> list[str]:
    return [f"--config.data.data_dir={data_dir}", *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


def train_losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def checkpoint_dirs(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def start_faulty_training(workdir, data_dir, compilation_cache, *fault_flags, devices=1):
    """train.py under tests/faults/train_with_faults.py, in a process of its own."""
    command = [sys.executable, "-m", "tests.faults.train_with_faults", *fault_flags, "--",
               f"--config=shapes_vqgan:tiny", f"--workdir={workdir}", *cli_overrides(data_dir)]
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(compilation_cache, devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_pause(process, workdir, timeout=300):
    marker = os.path.join(workdir, "paused")
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker):
        if process.poll() is not None:
            raise AssertionError(f"training ended before the pause:\n{process.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training never reached the pause")
        time.sleep(0.02)
    os.remove(marker)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, shapes_data_dir, compilation_cache):
    """(workdir, final test figures) of the uninterrupted run, trained in this process."""
    from dalle_jax.trainers import vqgan_trainer as vqgan
    workdir = str(tmp_path_factory.mktemp("reference"))
    final = vqgan.train(fault_config(shapes_data_dir), workdir)
    return workdir, final
