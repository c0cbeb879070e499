"""Loads a trained VQGAN from its work directory, for the stages that use it (encoding images, decoding samples).

Only the generator's parameters are read from the newest (or a chosen) checkpoint: the optimizer states, the
discriminator and the data iterator stay on disk. The parameters are restored straight into a replicated sharding
over the mesh, without an initialised model being built first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dalle_jax import parallel
from dalle_jax.models.vqgan import VQGAN
from dalle_jax.training import checkpointing, gan_losses, workdir as workdir_lib

TRAIN_COMMAND = "python train.py --config configs/shapes_vqgan.py --workdir {workdir}"


@dataclasses.dataclass(frozen=True)
class LoadedVQGAN:
    """A VQGAN restored from a work directory; `params` are replicated over the mesh they were loaded onto."""
    workdir: str
    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    params: dict
    step: int
    fingerprint: str
    grid_size: int
    codebook_size: int

    def model(self) -> VQGAN:
        return nnx.merge(self.graphdef, self.params)


def default_mesh() -> Mesh:
    """Every device on one data axis: the VQGAN is replicated, so only the batch is split."""
    return parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def load_vqgan(workdir: str, mesh: Mesh | None = None, *, step: int | None = None) -> LoadedVQGAN:
    """Restores the VQGAN of `workdir` at `step` (default: its newest checkpoint), replicated over `mesh`.

    The default mesh is `default_mesh()`. The training run's own `config.mesh` is not used: it may name more
    devices than the machine loading the model has.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"VQGAN work directory {workdir!r} does not exist. Train one with "
                                f"`{TRAIN_COMMAND.format(workdir=workdir)}`.")
    config = workdir_lib.load_config(workdir)
    trainer = config.get("trainer")
    if trainer != "vqgan":
        raise ValueError(f"{workdir!r} is a work directory of the {trainer!r} trainer, not of a VQGAN "
                         "(config.trainer must be 'vqgan'). Pass the work directory of a VQGAN run.")
    mesh = mesh if mesh is not None else default_mesh()

    abstract_model = nnx.eval_shape(lambda: VQGAN(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
    replicated = parallel.replicated(mesh)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          abstract_state.to_pure_dict())

    step, params = _restore_params(target, step, workdir)
    return LoadedVQGAN(workdir=os.path.abspath(workdir), config=config, graphdef=graphdef, params=params,
                       step=step, fingerprint=fingerprint(config.model, step, params),
                       grid_size=int(abstract_model.grid_size), codebook_size=int(abstract_model.codebook_size))


def _restore_params(target: dict, step: int | None, workdir: str) -> tuple[int, dict]:
    steps = checkpointing.checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"The VQGAN work directory {workdir!r} has no checkpoint in "
                                f"{os.path.join(workdir, 'checkpoints')} yet. Train it with "
                                f"`{TRAIN_COMMAND.format(workdir=workdir)}`.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{workdir!r} has no checkpoint of step {step}; it has steps {steps}.")
    return int(step), checkpointing.restore_params(workdir, step, target)


def decode_uint8(vqgan: LoadedVQGAN, params: dict, codes: jax.Array) -> jax.Array:
    """(N, grid*grid) codes -> uint8 (N, H, W, 3) through the decoder of `vqgan` with `params` (traceable, so
    callers compile it with what surrounds it)."""
    grid = codes.reshape(codes.shape[0], vqgan.grid_size, vqgan.grid_size)
    return gan_losses.to_uint8(nnx.merge(vqgan.graphdef, params).decode_code(grid))


def fingerprint(model_config: ml_collections.ConfigDict, step: int, params: dict) -> str:
    """sha256 over the model config, the step, and every parameter's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model_config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(f"step={int(step)}".encode())
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype.str}:{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()
