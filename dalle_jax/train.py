"""Trains a dalle_jax model: `dalle-jax-train --config RECIPE[:variant] --workdir DIR` (or `python train.py ...`).

RECIPE is a packaged recipe (`shapes_vqgan`, `images_dalle`, ...; see `dalle_jax/configs/`) or a recipe file's path.

Re-running on the same work directory resumes from its newest checkpoint. Any config field can be overridden,
e.g. `--config.num_steps=200 --config.data.batch_size=64`.

Multi-host: on a Cloud TPU pod run the same command on every worker (jax finds the others); elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to each process.
`--aot_topology=v5e:16x16` compiles the train step for that TPU pod on this machine instead of training, and
reports its per-chip memory, FLOPs, estimated step time and MFU (needs libtpu: `make tpu-venv`).
"""
from absl import app, flags, logging

from dalle_jax import command_line, recipes

_CONFIG = recipes.define_flag("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: config, checkpoints, metrics, samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, to join several processes into one run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
_AOT_TOPOLOGY = flags.DEFINE_string(
    "aot_topology", None, "Compile the train step ahead of time for this TPU topology (e.g. v5e:16x16, v4:4x4x4) "
    "and report memory and estimated speed instead of training; --workdir is not needed.")
flags.mark_flag_as_required("config")


def main(argv):
    logging.set_verbosity(logging.INFO)
    config = _CONFIG.value
    if config.trainer not in ("vqgan", "seq2seq", "captioner"):
        raise app.UsageError(f"config.trainer={config.trainer!r} is not a trainer; use 'vqgan', 'seq2seq' or "
                             "'captioner'.")
    if _AOT_TOPOLOGY.value:
        from dalle_jax.pods import aot
        try:
            report = aot.compile_for_topology(config, _AOT_TOPOLOGY.value)
            print(report.text())
            print(report.json_line())
            aot.check_fits(report)
        except aot.DoesNotFit as e:
            raise SystemExit(f"error: {e}") from None
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required to train (only --aot_topology runs without one).")

    from dalle_jax.training import checkpointing
    checkpointing.check_workdir(_WORKDIR.value)
    from dalle_jax.pods import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if config.trainer == "vqgan":
        from dalle_jax.trainers import vqgan_trainer as vqgan
        vqgan.train(config, _WORKDIR.value)
    elif config.trainer == "seq2seq":
        from dalle_jax.trainers import seq2seq_trainer as seq2seq
        seq2seq.train(config, _WORKDIR.value)
    else:
        from dalle_jax.trainers import captioner_trainer as captioner
        captioner.train(config, _WORKDIR.value)


def cli() -> None:
    """The `dalle-jax-train` command."""
    command_line.run(main, __name__, recipes.__name__)


if __name__ == "__main__":
    cli()
