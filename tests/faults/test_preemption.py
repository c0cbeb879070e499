"""Stopping a run from outside: SIGTERM and SIGINT checkpoint the current step and exit cleanly; `kill -9`, even
in the middle of an asynchronous save, resumes from the newest complete checkpoint. Either way the resumed run's
losses equal those of the uninterrupted run exactly."""
import os
import signal

from dalle_jax.trainers import vqgan_trainer as vqgan
from dalle_jax.training import checkpointing, metrics
from tests.faults.conftest import (fault_config, start_faulty_training, train_losses, wait_for_pause)


def _sigint_after_step(monkeypatch, step):
    """Sends this process SIGINT right after the train metrics of `step` are written."""
    write_scalars = metrics.MetricsWriter.write_scalars

    def write_then_interrupt(self, at_step, scalars):
        write_scalars(self, at_step, scalars)
        if at_step == step and "train/loss" in scalars:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(metrics.MetricsWriter, "write_scalars", write_then_interrupt)


def test_sigterm_then_sigint_lose_no_step(reference_run, tmp_path, shapes_data_dir, compilation_cache, monkeypatch):
    workdir = str(tmp_path / "run")
    # The signal arrives while step 2 is being logged; step 3 is the one running when the loop next looks.
    process = start_faulty_training(workdir, shapes_data_dir, compilation_cache, "--pause_in_log=2")
    wait_for_pause(process, workdir)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    assert "Stopped at step 3 (SIGTERM)" in output
    assert checkpointing.checkpoint_steps(workdir)[-1] == 3  # not a regular checkpoint step (every 4)
    assert max(train_losses(workdir)) == 3

    # Resumed here, then interrupted again (Ctrl-C) while step 6 is logged: step 7 is checkpointed.
    config = fault_config(shapes_data_dir)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        _sigint_after_step(patch, 6)
        assert vqgan.train(config, workdir) is None
    assert checkpointing.checkpoint_steps(workdir)[-1] == 7
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back

    final = vqgan.train(config, workdir)
    reference, reference_final = reference_run
    assert train_losses(workdir) == train_losses(reference)
    assert final["psnr"] == reference_final["psnr"]


def test_kill_9_during_an_async_save_resumes_from_the_last_complete_checkpoint(reference_run, tmp_path,
                                                                             shapes_data_dir, compilation_cache):
    workdir = str(tmp_path / "run")
    process = start_faulty_training(workdir, shapes_data_dir, compilation_cache, "--pause_in_save=8")
    wait_for_pause(process, workdir)
    partial = [name for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.startswith("8.")]
    assert partial, "checkpoint 8 should be half-written (a temporary directory) when the process is killed"
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert checkpointing.checkpoint_steps(workdir)[-1] == 4  # the partial step 8 is never listed

    final = vqgan.train(fault_config(shapes_data_dir), workdir)
    reference, reference_final = reference_run
    assert train_losses(workdir) == train_losses(reference)
    assert final["psnr"] == reference_final["psnr"]
    assert checkpointing.checkpoint_steps(workdir)[-1] == 12
