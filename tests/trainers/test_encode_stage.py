"""The VQGAN loader and the encode stage on the tiny config: exact codes, reuse, rebuild and resume."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dalle_jax.configs import shapes_vqgan
from dalle_jax import parallel
from dalle_jax.data import pipeline, shapes_scene, sources, token_records
from dalle_jax.trainers import encode_stage, vqgan_step
from dalle_jax import runs
from dalle_jax.training import checkpointing, gan_losses
from tests.conftest import REPO, TINY_SPLITS, subprocess_env

# 20 examples per shard with batches of 8: shards end in partial (padded) batches, and train has 4 shards.
PER_SHARD = 20
BATCH = 8


def tiny_config(data_dir):
    config = shapes_vqgan.get_config("tiny")
    config.data.data_dir = data_dir
    return config


def filled_state(config, mesh, seed):
    """A trainer state with vqgan_step.create's structure and shardings, filled from a seeded numpy generator.

    The compiled random init of the real state takes ~30 s on 2 cores, and these tests need only its layout.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "init_sharded", lambda init_fn, shardings: jax.eval_shape(init_fn))
        _, abstract, shardings = vqgan_step.create(config, mesh)
    return filled(abstract, shardings, np.random.default_rng(seed))


def filled(abstract, shardings, rng):
    """Arrays of the abstract tree's shapes from a seeded generator, placed in `shardings`."""
    def fill(leaf, sharding):
        if np.issubdtype(leaf.dtype, np.floating):
            fan_in = int(np.prod(leaf.shape[:-1])) or 1
            value = rng.normal(scale=fan_in ** -0.5, size=leaf.shape).astype(leaf.dtype)
        else:
            value = np.zeros(leaf.shape, leaf.dtype)
        return jax.device_put(value, sharding)
    return jax.tree.map(fill, abstract, shardings)


def save_checkpoint(config, workdir, step, state):
    """Saves like the trainer does: both the state and the data iterator's position."""
    builder = sources.prepare(config.data)
    train_iter = pipeline.train_iterator(
        sources.open_split(builder, "train", config.data),
        pipeline.image_transform(config.data.image_key, config.data.image_size),
        global_batch=config.data.batch_size, seed=config.seed)
    checkpointer = checkpointing.Checkpointer(workdir, keep=5, save_every=1)
    checkpointer.save(step, state, train_iter, force=True)
    checkpointer.close()


@pytest.fixture(scope="module")
def vqgan_workdir(tmp_path_factory, shapes_data_dir, compilation_cache):
    """A VQGAN work directory with checkpoints at steps 3 and 7 holding different parameters."""
    config = tiny_config(shapes_data_dir)
    workdir = str(tmp_path_factory.mktemp("vqgan_workdir"))
    runs.save_config(config, workdir)
    mesh = parallel.make_mesh(config.mesh)
    states = {3: filled_state(config, mesh, seed=0), 7: filled_state(config, mesh, seed=1)}
    for step, state in states.items():
        save_checkpoint(config, workdir, step, state)
    return workdir, config, {step: jax.device_get(state["params"]) for step, state in states.items()}


@pytest.fixture(scope="module")
def mesh():
    return runs.default_mesh()


@pytest.fixture(scope="module")
def vqgan(vqgan_workdir, mesh):
    return runs.load_vqgan(vqgan_workdir[0], mesh)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vqgan_workdir, vqgan, mesh):
    """An uninterrupted encode of every split, and its summary."""
    directory = str(tmp_path_factory.mktemp("encoded"))
    summary = encode_stage.encode_dataset(vqgan_workdir[1].data, vqgan, directory, mesh, batch_size=BATCH,
                                          examples_per_shard=PER_SHARD)
    return directory, summary


def read_split(directory, split):
    source = token_records.open_split(directory, split)
    return [source[i] for i in range(len(source))]


def assert_same_records(directory_a, directory_b):
    for split in TINY_SPLITS:
        for a, b in zip(read_split(directory_a, split), read_split(directory_b, split), strict=True):
            np.testing.assert_array_equal(a["codes"], b["codes"])
            assert (a["captions"], a["scene"]) == (b["captions"], b["scene"])


def mtimes(directory):
    return {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in os.listdir(directory)}


def direct_codes(vqgan, images):
    """model.encode on whole-split batches, outside the encode stage (with the XLA options the stage uses)."""
    model = vqgan.model()
    options = encode_stage.compiler_options(jax.devices()[0].platform)
    return np.asarray(jax.jit(lambda x: model.encode(gan_losses.to_float(x))[1], compiler_options=options)(images))


# --- loader -------------------------------------------------------------------------------------------------


def test_loader_restores_the_newest_params_replicated(vqgan_workdir, vqgan, mesh):
    workdir, config, saved = vqgan_workdir
    assert vqgan.step == 7 and vqgan.config.trainer == "vqgan"
    assert (vqgan.grid_size, vqgan.codebook_size) == (16, config.model.codebook_size)
    leaves = jax.tree.leaves(vqgan.params)
    assert all(leaf.sharding.is_fully_replicated and leaf.sharding.mesh == mesh for leaf in leaves)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(vqgan.params), saved[7])
    assert vqgan.model().grid_size == 16


def test_fingerprint_follows_the_checkpoint(vqgan_workdir, vqgan, mesh):
    workdir, _, saved = vqgan_workdir
    again = runs.load_vqgan(workdir, mesh)
    assert again.fingerprint == vqgan.fingerprint and len(vqgan.fingerprint) == 64
    older = runs.load_vqgan(workdir, mesh, step=3)
    assert older.step == 3 and older.fingerprint != vqgan.fingerprint
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(older.params), saved[3])
    # The step alone, or one changed parameter alone, changes it too.
    model_cfg = vqgan.config.model
    assert runs.vqgan_fingerprint(model_cfg, 8, saved[7]) != vqgan.fingerprint
    nudged = jax.tree.map(np.copy, saved[7])
    nudged["quantize"]["embedding"][0, 0] += 1.0
    assert runs.vqgan_fingerprint(model_cfg, 7, nudged) != vqgan.fingerprint
    assert runs.vqgan_fingerprint(model_cfg, 7, saved[7]) == vqgan.fingerprint


def test_loader_errors_name_the_problem_and_the_fix(tmp_path, vqgan_workdir):
    with pytest.raises(FileNotFoundError, match="does not exist. Train one with `dalle-jax-train"):
        runs.load_vqgan(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not a dalle_jax work directory"):
        runs.load_vqgan(str(tmp_path))
    config = vqgan_workdir[1].copy_and_resolve_references()
    runs.save_config(config, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*checkpoints yet.*dalle-jax-train --config "
                                                r"images_vqgan --workdir"):
        runs.load_vqgan(str(tmp_path))
    config.trainer = "seq2seq"
    runs.save_config(config, str(tmp_path))
    with pytest.raises(ValueError, match="of the 'seq2seq' trainer, not of a VQGAN"):
        runs.load_vqgan(str(tmp_path))
    with pytest.raises(ValueError, match=r"no checkpoint of step 5; it has steps \[3, 7\]"):
        runs.load_vqgan(vqgan_workdir[0], step=5)


# --- encode stage --------------------------------------------------------------------------------------------


def test_every_split_is_encoded_exactly(reference, vqgan_workdir, vqgan):
    directory, summary = reference
    assert summary["status"] == "built" and summary["splits"] == TINY_SPLITS
    assert summary["encoded_examples"] == sum(TINY_SPLITS.values())
    config = vqgan_workdir[1]
    builder = sources.prepare(config.data)
    for split, count in TINY_SPLITS.items():
        source = sources.open_split(builder, split, config.data)
        examples = [source[i] for i in range(count)]
        expected = direct_codes(vqgan, np.stack([e["image"] for e in examples]))
        records = read_split(directory, split)
        assert len(records) == count
        for example, grid, record in zip(examples, expected, records):
            np.testing.assert_array_equal(record["codes"], grid.reshape(-1))
            assert record["captions"][0] == pipeline.as_text(example["caption"])
            assert set(record["captions"]) == {pipeline.as_text(p) for p in example["paraphrases"]}
            assert record["scene"] == shapes_scene.scene_from_example(example)
    # The train split's 64 examples lie in shards of 20, 20, 20 and 4.
    manifest = token_records.read_manifest(directory)
    assert manifest["splits"]["train"]["shards"] == [f"train-0000{i}.array_record" for i in range(4)]
    assert manifest["vqgan"]["fingerprint"] == vqgan.fingerprint and manifest["grid_size"] == 16
    all_codes = np.concatenate([r["codes"] for r in read_split(directory, "train")])
    assert len(np.unique(all_codes)) > 1


def test_second_call_reuses_the_files(reference, vqgan_workdir, vqgan, mesh):
    directory, _ = reference
    before = mtimes(directory)
    summary = encode_stage.encode_dataset(vqgan_workdir[1].data, vqgan, directory, mesh, batch_size=BATCH,
                                          examples_per_shard=PER_SHARD)
    assert summary["status"] == "reused" and summary["encoded_examples"] == 0
    assert summary["splits"] == TINY_SPLITS
    assert mtimes(directory) == before


def test_a_lost_shard_is_encoded_again(tmp_path, reference, vqgan_workdir, vqgan, mesh):
    directory = str(tmp_path / "encoded")
    shutil.copytree(reference[0], directory)
    os.remove(os.path.join(directory, "validation-00000.array_record"))
    summary = encode_stage.encode_dataset(vqgan_workdir[1].data, vqgan, directory, mesh, batch_size=BATCH,
                                          examples_per_shard=PER_SHARD)
    assert summary["status"] == "resumed" and summary["encoded_examples"] == TINY_SPLITS["validation"]
    assert_same_records(directory, reference[0])


def test_another_checkpoint_rebuilds_everything(tmp_path, reference, vqgan_workdir, mesh):
    directory = str(tmp_path / "encoded")
    config = vqgan_workdir[1]
    older = runs.load_vqgan(vqgan_workdir[0], mesh, step=3)
    encode_stage.encode_dataset(config.data, older, directory, mesh, batch_size=BATCH, splits=["train", "test"],
                                examples_per_shard=PER_SHARD)
    # A file that is not part of the format survives the rebuild.
    with open(os.path.join(directory, "notes.txt"), "w") as f:
        f.write("mine")
    newer = runs.load_vqgan(vqgan_workdir[0], mesh)
    summary = encode_stage.encode_dataset(config.data, newer, directory, mesh, batch_size=BATCH,
                                          examples_per_shard=64)
    assert summary["status"] == "built" and summary["encoded_examples"] == sum(TINY_SPLITS.values())
    assert sorted(os.listdir(directory)) == sorted(
        ["manifest.json", "notes.txt"] + [f"{split}-00000.array_record" for split in TINY_SPLITS])
    assert_same_records(directory, reference[0])


def test_interrupted_encode_resumes_from_complete_shards(tmp_path, reference, vqgan_workdir, vqgan, mesh,
                                                        monkeypatch):
    directory = str(tmp_path / "encoded")
    config = vqgan_workdir[1]
    original = encode_stage._encode_shard
    calls = []

    def interrupted(path, batches, *args):
        calls.append(path)
        # Splits go in sorted order: test, test_compositional, then train, whose second shard dies after its first
        # batch, leaving a partial .tmp file.
        if len(calls) == 4:
            def first_batch_then_fail():
                yield next(iter(batches))
                raise KeyboardInterrupt
            return original(path, first_batch_then_fail(), *args)
        return original(path, batches, *args)

    monkeypatch.setattr(encode_stage, "_encode_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_stage.encode_dataset(config.data, vqgan, directory, mesh, batch_size=BATCH,
                                    examples_per_shard=PER_SHARD)
    assert sorted(os.listdir(directory)) == ["manifest.json", "test-00000.array_record",
                                             "test_compositional-00000.array_record", "train-00000.array_record",
                                             "train-00001.array_record.tmp"]
    with pytest.raises(ValueError, match="not complete"):
        token_records.open_split(directory, "train")
    kept = mtimes(directory)

    monkeypatch.setattr(encode_stage, "_encode_shard", original)
    summary = encode_stage.encode_dataset(config.data, vqgan, directory, mesh, batch_size=BATCH,
                                          examples_per_shard=PER_SHARD)
    assert summary["status"] == "resumed"
    kept_examples = TINY_SPLITS["test"] + TINY_SPLITS["test_compositional"] + PER_SHARD
    assert summary["encoded_examples"] == sum(TINY_SPLITS.values()) - kept_examples
    after = mtimes(directory)
    for name in ("test-00000.array_record", "test_compositional-00000.array_record", "train-00000.array_record"):
        assert after[name] == kept[name]
    assert not any(name.endswith(".tmp") for name in after)
    assert_same_records(directory, reference[0])
    with open(os.path.join(directory, "manifest.json")) as f:
        assert json.load(f) == token_records.read_manifest(reference[0])


SHARDED_ENCODE = """
import sys
import ml_collections
from dalle_jax import parallel
from dalle_jax import runs
from dalle_jax.trainers import encode_stage
workdir_path, data_dir, out = sys.argv[1:]
config = runs.load_config(workdir_path)
config.data.data_dir = data_dir
mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
vqgan = runs.load_vqgan(workdir_path, mesh)
encode_stage.encode_dataset(config.data, vqgan, out, mesh, batch_size=8, examples_per_shard=20)
"""


def test_eight_device_mesh_gives_the_same_records(tmp_path, reference, vqgan_workdir, shapes_data_dir,
                                                  compilation_cache):
    # Each batch is split 4 ways (data x fsdp), so every device holds 2 rows, and padded rows sit on some devices.
    directory = str(tmp_path / "encoded")
    result = subprocess.run([sys.executable, "-c", SHARDED_ENCODE, vqgan_workdir[0], shapes_data_dir, directory],
                            cwd=REPO, env=subprocess_env(compilation_cache, devices=8), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_records(directory, reference[0])


def test_chunked_batches_give_the_same_records_and_skip_padding(tmp_path, reference, vqgan_workdir, vqgan, mesh,
                                                                monkeypatch):
    # Two rows per encode call: a batch of 8 takes 4 calls, and a shard's last batch of 4 real rows takes 2.
    monkeypatch.setattr(encode_stage, "_DEVICE_ROWS", 2)
    compiled = encode_stage._compiled_encode(vqgan.graphdef, mesh)
    rows = []

    def counting(params, images):
        rows.append(images.shape[0])
        return compiled(params, images)

    monkeypatch.setattr(encode_stage, "_compiled_encode", lambda graphdef, mesh: counting)
    directory = str(tmp_path / "encoded")
    encode_stage.encode_dataset(vqgan_workdir[1].data, vqgan, directory, mesh, batch_size=BATCH,
                                examples_per_shard=PER_SHARD)
    assert rows == [2] * (sum(TINY_SPLITS.values()) // 2)
    assert_same_records(directory, reference[0])


def test_chunk_rows_split_the_batch_evenly_over_the_devices(monkeypatch):
    monkeypatch.setattr(encode_stage, "_DEVICE_ROWS", 64)
    assert encode_stage._chunk_rows(500, 1) == 50
    assert encode_stage._chunk_rows(64, 1) == 64
    assert encode_stage._chunk_rows(8, 4) == 8
    assert encode_stage._chunk_rows(3000, 8) == 200
    assert encode_stage._chunk_rows(1021, 1) == 1021  # a prime batch is not cut into single rows


def test_bad_inputs_fail_before_any_work(tmp_path, vqgan_workdir, vqgan, mesh):
    data = vqgan_workdir[1].data.copy_and_resolve_references()
    with pytest.raises(ValueError, match="examples_per_shard=0"):
        encode_stage.encode_dataset(data, vqgan, str(tmp_path), mesh, batch_size=BATCH, examples_per_shard=0)
    with pytest.raises(ValueError, match=r"splits=\['dev'\] names splits"):
        encode_stage.encode_dataset(data, vqgan, str(tmp_path), mesh, batch_size=BATCH, splits=["dev"])
    data.image_size = 64
    with pytest.raises(ValueError, match=r"config.data.image_size=64 .* Set config.data.image_size=32"):
        encode_stage.encode_dataset(data, vqgan, str(tmp_path), mesh, batch_size=BATCH)
    assert os.listdir(tmp_path) == []
