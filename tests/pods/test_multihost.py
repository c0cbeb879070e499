"""Multi-host pieces: each process reads only its block of every global batch; distributed flags are checked.
The trainers' 2-process x 4-device runs are compared with their 1-process 8-device runs in tests/trainers/
(`test_two_processes_match_one_process_of_eight_devices`), which share those reference runs with the mesh tests."""
import numpy as np
import pytest

from dalle_jax.data import pipeline


@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_reads_its_own_block_of_every_global_batch(monkeypatch, processes):
    """The processes' local batches, side by side, are the single-process global batches (random draws too)."""
    source = [{"x": np.int64(i)} for i in range(40)]
    draw = lambda example, rng: {"x": example["x"], "draw": rng.integers(1 << 30)}

    def batches(index, count, n=5):  # 5 batches of 8: one epoch of 40
        monkeypatch.setattr(pipeline.jax, "process_index", lambda: index)
        monkeypatch.setattr(pipeline.jax, "process_count", lambda: count)
        it = pipeline.train_iterator(source, None, global_batch=8, seed=3, read_threads=0, prefetch=0,
                                     random_transform=draw)
        return [next(it) for _ in range(n)]

    whole = batches(0, 1)
    parts = [batches(p, processes) for p in range(processes)]
    for step, expected in enumerate(whole):
        for key in ("x", "draw"):
            local = [part[step][key] for part in parts]
            assert all(len(x) == 8 // processes for x in local)
            np.testing.assert_array_equal(np.concatenate(local), expected[key])
    seen = [set(np.concatenate([b["x"] for b in part]).tolist()) for part in parts]
    assert not set.intersection(*seen) and set.union(*seen) == set(range(40))


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:1234", None, 0), "needs --num_processes and --process_id"),
    (("127.0.0.1:1234", 2, 2), r"--process_id=2 must lie in \[0, --num_processes=2\)"),
    ((None, 2, 0), "need --coordinator_address"),
])
def test_bad_distributed_flags_are_named_before_anything_starts(args, message):
    from dalle_jax.pods import distributed
    with pytest.raises(ValueError, match=message):
        distributed.initialize(*args)


def test_a_single_machine_without_flags_runs_alone():
    from dalle_jax.pods import distributed
    assert distributed.initialize() is False
