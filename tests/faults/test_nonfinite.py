"""Non-finite losses, gradients or updates: the step leaves the state as it was and says so; too many in a row
stop the run with a clear message and leave the last good checkpoint in place."""
import jax
import numpy as np
import pytest

from dalle_jax import parallel
from dalle_jax.trainers import vqgan_trainer as vqgan, vqgan_step
from dalle_jax import runs
from dalle_jax.training import checkpointing, loop
from dalle_jax.training.metrics import read_metrics
from tests.faults.conftest import fault_config, train_losses


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_a_step_with_nan_pixels_is_skipped_and_the_next_one_applies(shapes_data_dir, compilation_cache):
    config = fault_config(shapes_data_dir)
    mesh = parallel.make_mesh(config.mesh)
    setup, state, _ = vqgan_step.create(config, mesh)
    step = jax.jit(lambda s, b: vqgan_step.train_step(setup, s, b))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.float32)
    poisoned = images.copy()
    poisoned[3, 5, 7, 1] = np.nan  # one bad pixel of one example: the loss and every gradient turn NaN
    before = jax.device_get(state)

    skipped, metrics = step(state, dict(image=poisoned))
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(skipped["step"]) == 1  # the step counter (data position, RNG) moves on; nothing else does
    _assert_trees_equal({k: v for k, v in skipped.items() if k != "step"},
                        {k: v for k, v in before.items() if k != "step"})

    applied, metrics = step(skipped, dict(image=images))
    assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert int(applied["step"]) == 2
    # (The warmup's learning rate is 0 at the first update, so it shows in the optimizer's moments, not the params.)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(applied["opt_g"]),
                                           before["opt_g"]))
    assert any(changed)


def test_window_means_leave_out_skipped_steps_and_count_them():
    steps = [dict(loss=1.0, nonfinite=0.0), dict(loss=float("nan"), nonfinite=1.0), dict(loss=3.0, nonfinite=0.0)]
    assert loop.mean_metrics(steps) == dict(loss=2.0, nonfinite_steps=1.0)


def test_too_many_skips_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, shapes_data_dir,
                                                                                compilation_cache):
    workdir = str(tmp_path / "run")
    assert vqgan.train(fault_config(shapes_data_dir), workdir, stop_after=4) is None
    good = runs.load_vqgan(workdir, step=4).params
    # The resumed run's learning rate is infinite: every update from step 5 on is non-finite.
    poisoned = fault_config(shapes_data_dir, **{"optimizer.learning_rate": float("inf"),
                                                "faults.max_consecutive_nonfinite": 3})
    with pytest.raises(loop.NonFiniteTraining, match=r"Steps 5-7: 3 updates in a row had a non-finite loss, gradient "
                                                     r"or update .*max_consecutive_nonfinite=3.*step 4"):
        vqgan.train(poisoned, workdir)
    assert checkpointing.checkpoint_steps(workdir)[-1] == 4
    _assert_trees_equal(runs.load_vqgan(workdir).params, good)
    lines = {m["step"]: m for m in read_metrics(workdir) if "train/nonfinite_steps" in m}
    assert [lines[s]["train/nonfinite_steps"] for s in (4, 5, 6, 7)] == [0.0, 1.0, 1.0, 1.0]
    assert max(train_losses(workdir)) == 7



def test_seq2seq_step_skips_a_non_finite_update(compilation_cache):
    from dalle_jax.configs import shapes_dalle
    from dalle_jax.trainers import seq2seq_step
    config = shapes_dalle.get_config("tiny")
    config.optimizer.learning_rate = float("inf")  # finite loss and gradients, infinite update
    mesh = parallel.make_mesh(config.mesh)
    setup, state, _ = seq2seq_step.create(config, mesh)
    rng = np.random.default_rng(0)
    batch = dict(text_ids=rng.integers(4, config.model.text_vocab_size, (8, config.model.text_length), np.int32),
                 codes=rng.integers(0, config.model.image_vocab_size, (8, config.model.image_length), np.int32))
    before = jax.device_get(state)
    after, metrics = jax.jit(lambda s, b: seq2seq_step.train_step(setup, s, b))(state, batch)
    assert float(metrics["nonfinite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
    assert int(after["step"]) == 1
    _assert_trees_equal((after["params"], after["opt_state"]), (before["params"], before["opt_state"]))
