"""Shared fixtures: a tiny captioned_shapes dataset prepared once per session, and a compilation cache."""
import os

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SPLITS = dict(train=64, validation=16, test=16, test_compositional=16)


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the session, shared with subprocesses, so repeated runs compile once."""
    path = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """A data_dir holding captioned_shapes 32x32 with the tiny config's split sizes, prepared once."""
    import ml_collections
    from dalle_jax.data import sources

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data = ml_collections.ConfigDict(dict(dataset="captioned_shapes", folder="", data_dir=data_dir, image_size=32,
                                          shapes_split_sizes=TINY_SPLITS, image_key="image", text_key="caption"))
    sources.prepare(data)
    return data_dir


def subprocess_env(compilation_cache: str, devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env
