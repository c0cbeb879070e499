"""Trains a dalle_jax model: `python train.py --config configs/NAME.py[:variant] --workdir DIR`.

Re-running on the same work directory resumes from its newest checkpoint. Any config field can be overridden,
e.g. `--config.num_steps=200 --config.data.batch_size=64`.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes_vqgan.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: config, checkpoints, metrics, samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    config = _CONFIG.value
    if config.trainer == "vqgan":
        from dalle_jax.trainers import vqgan
        vqgan.train(config, _WORKDIR.value)
    elif config.trainer == "seq2seq":
        from dalle_jax.trainers import seq2seq
        seq2seq.train(config, _WORKDIR.value)
    else:
        raise app.UsageError(f"config.trainer={config.trainer!r} is not a trainer; use 'vqgan' or 'seq2seq'.")


if __name__ == "__main__":
    app.run(main)
