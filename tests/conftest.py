"""Shared fixtures: a tiny captioned_shapes dataset prepared once per session, a compilation cache shared by every
process of the session, and the environment of the subprocesses tests start."""
import json
import os
import shutil

# Tests compile as users do: LLVM optimisation level 0 compiled the tiny programs 2-4x faster, but the 8-device VQGAN
# run then left the 1-device one by 5% at a GAN-phase step (a hinge flipping on a last-digit difference). One explicit
# device, set before jax creates its CPU backend, so that the cache keys of this process and of 1-device subprocesses
# (below) agree.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SPLITS = dict(train=64, validation=16, test=16, test_compositional=16)
# Entries are written and read under a file lock (which needs a size limit), so concurrent processes never read half
# a file. Only programs that took over half a second are kept: reading the many small ones back costs about what
# compiling them does, and each write scans the whole cache directory.
CACHE_SETTINGS = dict(jax_persistent_cache_min_compile_time_secs=0.5, jax_persistent_cache_min_entry_size_bytes=0,
                      jax_compilation_cache_max_size=1 << 40)


def session_root(tmp_path_factory):
    """The session's temporary directory, shared by every xdist worker (each has its own directory below it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def once_per_session(tmp_path_factory, name: str, build) -> tuple[str, dict]:
    """(work directory, figures) of `build(work directory)`, run once for the whole session by whichever worker
    asks first; a worker that asks meanwhile waits for it. For the trainers' reference runs, which the single- and
    multi-device test units both compare against but which xdist may hand to different workers. Readers must not
    write into the directory."""
    from filelock import FileLock

    root = session_root(tmp_path_factory)
    workdir, figures = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not figures.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            figures.write_text(json.dumps(build(str(workdir))))
    return str(workdir), json.loads(figures.read_text())


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the session, shared by both xdist workers and the subprocesses of either, so a
    program compiled anywhere in the session is compiled once. (The key covers the program, devices, jax version
    and XLA flags, so a hit is the same executable.)"""
    path = session_root(tmp_path_factory) / "xla_cache"
    path.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    for name, value in CACHE_SETTINGS.items():
        jax.config.update(name, value)
    return str(path)


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """A data_dir holding captioned_shapes 32x32 with the tiny config's split sizes, prepared once per session."""
    import ml_collections
    from dalle_jax.data import sources

    def build(data_dir):
        sources.prepare(ml_collections.ConfigDict(dict(
            dataset="captioned_shapes", folder="", data_dir=data_dir, image_size=32, shapes_split_sizes=TINY_SPLITS,
            image_key="image", text_key="caption")))
        return {}

    return once_per_session(tmp_path_factory, "tfds", build)[0]


def subprocess_env(compilation_cache: str, devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache
    for name, value in CACHE_SETTINGS.items():
        env[name.upper()] = str(value)
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env



# Scheduling under `pytest -n 2 --dist loadfile` (`make test`). A unit of work is a file, so its module fixtures are
# built once in one worker, except where UNITS says otherwise: the trainers' multi-device runs go apart from their
# single-device runs (different fixtures), the two fault files that share the session's reference run go together,
# the independent long runs of test_nonfinite go alone, and the two files that share the tiny captioner run go
# together. Units are handed out longest first (COST: seconds on an idle 2-core machine, rounded; only the order
# matters), so no worker is left alone with a long one at the end.
UNITS = {
    "trainers/test_vqgan_trainer.py::test_eight_device_mesh_matches_one_device": "vqgan_trainer_meshes",
    "trainers/test_vqgan_trainer.py::test_two_processes_match_one_process_of_eight_devices": "vqgan_trainer_meshes",
    "trainers/test_seq2seq_trainer.py::test_eight_device_mesh_matches_one_device": "seq2seq_trainer_meshes",
    "trainers/test_seq2seq_trainer.py::test_two_processes_match_one_process_of_eight_devices": "seq2seq_trainer_meshes",
    "faults/test_nonfinite.py::test_a_step_with_nan_pixels_is_skipped_and_the_next_one_applies": "nonfinite_pixels",
    "faults/test_nonfinite.py::test_too_many_skips_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint":
        "nonfinite_stop",
    "faults/test_preemption.py": "faults_resume",
    "faults/test_corrupt_checkpoints.py": "faults_resume",
    # Both use the session's one tiny captioner run.
    "trainers/test_captioner_trainer.py": "captioner_runs",
    "inference/test_reranked_sampling.py": "captioner_runs",
    # Both use one server process.
    "serve/test_api.py": "serve",
    "serve/test_page.py": "serve",
}
COST = {
    "seq2seq_trainer_meshes": 275, "faults_resume": 230, "vqgan_trainer_meshes": 150, "captioner_runs": 100,
    "nonfinite_stop": 87, "test_installed_package.py": 85,
    "trainers/test_vqgan_trainer.py": 85, "trainers/test_seq2seq_trainer.py": 80,
    "trainers/test_own_images.py": 56,
    "faults/test_reshard_and_configs.py": 70, "test_sharded_gradients.py": 65, "test_sharded_vqgan.py": 165, "faults/test_bad_training_data.py": 53, "interop/test_finetune_imported.py": 44, "pods/test_aot.py": 36,
    "shapes/test_evaluate_samples.py": 33, "test_sharding_strategies.py": 31, "trainers/test_encode_stage.py": 29,
    "trainers/test_seq2seq_step.py": 26, "test_sample_cli.py": 25, "nonfinite_pixels": 24,
    "models/test_dalle_bart.py": 22, "storage/test_bucket_runs.py": 150, "storage/test_bucket_dalle.py": 145, "storage/test_s3.py": 8, "interop/test_cli.py": 21, "serve": 80,
}


def unit_of(nodeid: str) -> str:
    """The unit of work of a test id such as `tests/faults/test_nonfinite.py::test_x[param]`."""
    path, _, name = nodeid.partition("::")
    path = os.path.relpath(os.path.join(os.getcwd(), path), os.path.join(REPO, "tests"))
    return UNITS.get(f"{path}::{name.split('[')[0]}", UNITS.get(path, path))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` over the units above, in the collection's order (set below) rather than xdist's."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    config.option.loadscopereorder = False  # xdist would order units by their number of tests
    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Under xdist: the units in order of COST, longest first, each unit's tests together and in file order."""
    if not hasattr(config, "workerinput"):
        return
    order = {item.nodeid: (-COST.get(unit_of(item.nodeid), 0), i) for i, item in enumerate(items)}
    items.sort(key=lambda item: order[item.nodeid])
