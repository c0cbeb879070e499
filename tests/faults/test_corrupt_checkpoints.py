"""Damaged checkpoints: a clear error naming the step and the file, and `faults.restore_fallback` to resume from the
newest intact one (with the losses of the uninterrupted run)."""
import glob
import logging
import os
import shutil

import pytest

from dalle_jax.trainers import vqgan_trainer as vqgan
from dalle_jax import runs
from dalle_jax.training import checkpointing
from tests.faults.conftest import fault_config, train_losses


def _truncate_array_files(step_dir):
    # Every data file: which arrays share a file varies from run to run, and a reader of the generator alone
    # (vqgan_load) must meet the damage too.
    for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
        with open(path, "r+b") as f:
            f.truncate(min(1000, os.path.getsize(path) // 2))


@pytest.fixture
def damaged_copy(reference_run, tmp_path):
    """The reference run with checkpoint 12's array data truncated and checkpoint 8's metadata emptied."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run[0], workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    assert checkpointing.checkpoint_steps(workdir) == [4, 8, 12]
    _truncate_array_files(os.path.join(checkpoints, "12"))
    open(os.path.join(checkpoints, "8", "state", "_METADATA"), "w").close()
    return workdir


def test_a_corrupt_checkpoint_is_named_and_the_fix_given(damaged_copy, shapes_data_dir):
    config = fault_config(shapes_data_dir)
    with pytest.raises(checkpointing.CorruptCheckpoint) as error:
        vqgan.train(config, damaged_copy)
    message = str(error.value)
    assert f"Checkpoint step 12 in {damaged_copy}/checkpoints is corrupt" in message
    assert "in OCDBT database at local file" in message and "checkpoints/12/state/" in message
    assert "older steps on disk: [4, 8]" in message and "--config.faults.restore_fallback=true" in message
    assert checkpointing.checkpoint_steps(damaged_copy) == [4, 8, 12]  # nothing moved without the flag

    with pytest.raises(checkpointing.CorruptCheckpoint, match=r"step 12 .* Load an older checkpoint instead "
                                                              r"\(steps \[4, 8\]; sample.py: --step\)"):
        runs.load_vqgan(damaged_copy)


def test_fallback_resumes_from_the_newest_intact_checkpoint(damaged_copy, reference_run, shapes_data_dir, caplog):
    config = fault_config(shapes_data_dir, **{"faults.restore_fallback": True})
    with caplog.at_level(logging.ERROR):
        final = vqgan.train(config, damaged_copy)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Checkpoint step 12" in logged
    assert f"Checkpoint step 8 in {damaged_copy}/checkpoints is corrupt: " \
           f"{damaged_copy}/checkpoints/8/state/_METADATA (empty file)" in logged
    assert sorted(os.listdir(os.path.join(damaged_copy, "corrupt_checkpoints"))) == ["12", "8"]
    # Resumed from step 4: steps 5-12 are trained again, exactly as the first time.
    assert train_losses(damaged_copy) == train_losses(reference_run[0])
    assert final["psnr"] == reference_run[1]["psnr"]
    assert checkpointing.checkpoint_steps(damaged_copy) == [4, 8, 12]
