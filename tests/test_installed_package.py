"""The built wheel, installed into an environment of its own, runs tiny train -> sample -> export with its console
commands from a directory outside the checkout.

The new environment holds only the wheel. Its dependencies are the test environment's, put on its path by a plain
.pth line (so the checkout's editable install, whose hook that directory's own .pth files would load, stays out):
what is tested is the package as installed, not a fresh download of jax and tensorflow.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, subprocess_env

# Each command and a flag its --help must show.
COMMANDS = {"dalle-jax-train": "--config", "dalle-jax-sample": "--prompt", "dalle-jax-export": "--format",
            "dalle-jax-import": "--src", "dalle-jax-evaluate": "--max_examples", "dalle-jax-demo": "--root",
            "dalle-jax-serve": "--max_wait_ms"}


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin directory, environment variables) of a new environment holding the wheel built from this checkout."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"  # only what the wheel is built from, so the build leaves the checkout untouched
    source.mkdir()
    shutil.copy(os.path.join(REPO, "setup.py"), source)
    shutil.copytree(os.path.join(REPO, "dalle_jax"), source / "dalle_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--wheel-dir", str(root / "dist"), str(source)])
    (wheel,) = (root / "dist").glob("dalle_jax-*.whl")
    env_dir = root / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    python = str(env_dir / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index",
          str(wheel)])
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    with open(os.path.join(site, "test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    return env_dir / "bin", env


def test_every_command_is_installed_and_the_package_is_the_wheel(installed, tmp_path):
    bin_dir, env = installed
    for command, flag in COMMANDS.items():
        assert (bin_dir / command).is_file(), command
        # absl's --help exits with 1, argparse's with 0.
        result = subprocess.run([command, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode in (0, 1) and flag in result.stdout, (command, result.stdout, result.stderr)
    where = _run([str(bin_dir / "python"), "-c", "import dalle_jax, dalle_jax.configs; print(dalle_jax.__file__)"],
                 cwd=tmp_path, env=env).stdout.strip()
    assert where.startswith(str(bin_dir.parent)) and not where.startswith(REPO), where
    page = _run([str(bin_dir / "python"), "-c", "from importlib import resources; "
                 "print(resources.files('dalle_jax.serve').joinpath('page.html').read_text())"],
                cwd=tmp_path, env=env).stdout
    assert "<html" in page.lower()  # the web page ships in the wheel


def test_tiny_train_sample_export_from_outside_the_checkout(installed, tmp_path, shapes_data_dir, compilation_cache):
    bin_dir, env = installed
    env = dict(subprocess_env(compilation_cache), PATH=env["PATH"])
    env.pop("PYTHONPATH", None)
    run = dict(cwd=tmp_path, env=env)
    data = f"--config.data.data_dir={shapes_data_dir}"
    # Three levels: the 8x8 grid of codes shapes_dalle:tiny predicts.
    _run(["dalle-jax-train", "--config", "shapes_vqgan:tiny", "--workdir", "runs/vqgan", data,
          "--config.model.ch_mult=(1,2,2)"], **run)
    _run(["dalle-jax-train", "--config", "shapes_dalle:tiny", "--workdir", "runs/dalle", data,
          "--config.vqgan_workdir=runs/vqgan"], **run)
    _run(["dalle-jax-sample", "--workdir", "runs/dalle", "--prompt", "a small red circle in the top left",
          "--num_images", "2", "--out", "grid.png"], **run)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert 32 <= grid.shape[0] < 2 * 32 and grid.shape[1] >= 2 * 32 and grid.std() > 0  # one row of two
    _run(["dalle-jax-export", "--workdir", "runs/dalle", "--format", "safetensors", "--out", "exported"], **run)
    assert any(name.endswith(".safetensors") for name in os.listdir(tmp_path / "exported"))


def test_a_recipe_name_that_does_not_exist_is_refused_with_the_list(installed, tmp_path):
    bin_dir, env = installed
    result = subprocess.run(["dalle-jax-train", "--config", "shapes_vqgam:tiny", "--workdir", "w"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "'shapes_vqgam' is not a packaged recipe" in result.stderr and "shapes_vqgan" in result.stderr
