"""Loads a trained caption model (the reranker) from its work directory: config and parameters, replicated."""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from dalle_jax import parallel
from dalle_jax.models.captioner import Captioner
from dalle_jax.trainers import captioner_step
from dalle_jax.training import checkpointing, workdir as workdir_lib

TRAIN_COMMAND = ("python train.py --config configs/shapes_captioner.py --workdir {workdir} "
                 "--config.seq2seq_workdir=runs/dalle")


@dataclasses.dataclass(frozen=True)
class LoadedCaptioner:
    workdir: str
    config: ml_collections.ConfigDict
    setup: captioner_step.Setup
    params: dict
    step: int

    def model(self) -> Captioner:
        return self.setup.model(self.params)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of the caption model trained in `workdir`; fails, naming the fix, if there is none."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"Reranker work directory {workdir!r} does not exist. Train one with "
                                f"`{TRAIN_COMMAND.format(workdir=workdir)}`.")
    config = workdir_lib.load_config(workdir)
    if config.get("trainer") != "captioner":
        raise ValueError(f"{workdir!r} is a work directory of the {config.get('trainer')!r} trainer, not of a caption "
                         "model (config.trainer must be 'captioner'). Pass a run of configs/shapes_captioner.py.")
    return config


def load_captioner(workdir: str, mesh: Mesh, *, step: int | None = None) -> LoadedCaptioner:
    """Restores the caption model of `workdir` at `step` (default: its newest checkpoint), replicated over `mesh`."""
    config = read_config(workdir)
    steps = checkpointing.training_steps(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         checkpointing.checkpoint_steps(workdir))
    if not steps:
        raise FileNotFoundError(f"The reranker work directory {workdir!r} has no checkpoint yet. Train it with "
                                f"`{TRAIN_COMMAND.format(workdir=workdir)}`.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{workdir!r} has no checkpoint of step {step}; it has steps {steps}.")
    setup, _, shardings = captioner_step.create(config, mesh, initialize=False)
    abstract = nnx.state(captioner_step.abstract_model(config), nnx.Param).to_pure_dict()
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                          shardings["params"])
    params = checkpointing.restore_params(workdir, step, target)
    return LoadedCaptioner(workdir=os.path.abspath(workdir), config=config, setup=setup, params=params,
                           step=int(step))
