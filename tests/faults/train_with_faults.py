"""Runs `train.py` with its own flags in this process, after arranging one fault-injection pause (test helper).

    python -m tests.faults.train_with_faults --pause_in_log=3 -- --config ... --workdir DIR
    python -m tests.faults.train_with_faults --pause_in_save=8 -- --config ... --workdir DIR

`--pause_in_log=N`: when the train metrics of step N are written, touch `DIR/paused` and wait there (up to a
minute) until a stop is requested, so a test can signal the process at a step it knows.
`--pause_in_save=N`: when orbax is about to rename checkpoint N's finished temporary directory into place, touch
`DIR/paused` and sleep, so a test can kill the process in the middle of an asynchronous save.
Nothing in the package changes: the pauses wrap a metrics writer method and orbax's finalisation from outside.
"""
import os
import runpy
import sys
import time

from dalle_jax.training import interrupts, metrics


def _workdir(argv) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir":
            return argv[i + 1]
    raise SystemExit("pass --workdir to train.py")


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def pause_in_log(step: int, marker: str) -> None:
    write_scalars = metrics.MetricsWriter.write_scalars
    requests = []
    enter = interrupts.StopRequests.__enter__

    def remember(self):
        requests.append(self)
        return enter(self)

    def paused(self, at_step, scalars):
        write_scalars(self, at_step, scalars)
        if at_step == step and any(k.startswith("train/") for k in scalars):
            _touch(marker)
            deadline = time.monotonic() + 60
            while requests[-1].received is None and time.monotonic() < deadline:
                time.sleep(0.01)

    interrupts.StopRequests.__enter__ = remember
    metrics.MetricsWriter.write_scalars = paused


def pause_in_save(step: int, marker: str) -> None:
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def paused(self, *args, **kwargs):
        if os.path.basename(os.fspath(self.get_final())) == str(step):
            _touch(marker)
            time.sleep(120)  # blocks orbax's background save thread only; the train loop goes on
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = paused


def main() -> None:
    split = sys.argv.index("--")
    ours, train_args = sys.argv[1:split], sys.argv[split + 1:]
    marker = os.path.join(_workdir(train_args), "paused")
    for arg in ours:
        name, value = arg.lstrip("-").split("=")
        {"pause_in_log": pause_in_log, "pause_in_save": pause_in_save}[name](int(value), marker)
    sys.argv = ["train.py", *train_args]
    runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
