"""Finished runs, loaded for use: a work directory's config, its parameters at a step, its tokenizer, its VQGAN.

Every stage writes one work directory (`config.json`, `checkpoints/`, metrics); sampling, the Python API, export,
evaluation and the demo read them through this module alone. Only parameters are read from a checkpoint (a partial
restore of its "state" item), straight into the shardings they take on the mesh they are loaded onto, without an
initialised model being built first: optimizer states and data positions stay on disk. A run's own `config.mesh`
is not used: it may name more devices than the machine loading it has.

    seq2seq = runs.load_seq2seq("runs/dalle")          # DalleBart, its tokenizer, its config
    vqgan = runs.load_vqgan(seq2seq.config.vqgan_workdir)
    reranker = runs.load_reranker("runs/reranker")     # the caption model that picks among candidates

A reranker that finishes training registers itself in the seq2seq run it serves (`reranker.json`, see
`register_reranker`), so sampling that run picks among candidates with it unless told otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dalle_jax import extensions, parallel, storage
from dalle_jax.data import text as text_lib
from dalle_jax.data import min_dalle_tokenizer
from dalle_jax.models import transformer_layers as tl
from dalle_jax.models.captioner import Captioner
from dalle_jax.models.dalle_bart import DalleBart
from dalle_jax.models.vqgan import VQGAN
from dalle_jax.training import checkpointing, gan_losses

CONFIG_FILE = "config.json"
RERANKER_FILE = "reranker.json"  # in a seq2seq run: the reranker sampling uses by default (`register_reranker`)
TOKENIZER_FILE = "tokenizer.model"  # a seq2seq run's sentencepiece model (min-dalle imports keep their BPE files)
TOKENIZER_FILES = (TOKENIZER_FILE, min_dalle_tokenizer.VOCAB_FILE, min_dalle_tokenizer.MERGES_FILE)
# What each trainer's run is called in messages, and the command that makes one.
KINDS = {  # each trainer's name in messages, and the command that makes such a run (the demo data's recipes in [])
    "vqgan": ("VQGAN", "dalle-jax-train --config images_vqgan --workdir {workdir} --config.data.folder=IMAGES "
                       "[or --config shapes_vqgan]"),
    "seq2seq": ("seq2seq", "dalle-jax-train --config images_dalle --workdir {workdir} "
                           "--config.vqgan_workdir=runs/vqgan [or --config shapes_dalle]"),
    "captioner": ("reranker", "dalle-jax-train --config shapes_captioner --workdir {workdir} "
                              "--config.seq2seq_workdir=runs/dalle"),
}


# The work directory's record.

def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes `workdir/config.json` (process 0): what later stages read to rebuild the run's models."""
    if jax.process_index() == 0:
        storage.makedirs(workdir)
        storage.write_atomic(storage.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2, sort_keys=True)
                             + "\n")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a dalle_jax work directory "
                                "(train.py writes config.json there when a run starts).")
    with storage.open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def read_config(workdir: str, trainer: str) -> ml_collections.ConfigDict:
    """The config of the `trainer` run in `workdir`; fails, naming the command that makes one, when `workdir` does
    not exist, is not a work directory, or holds another trainer's run."""
    name, command = KINDS[trainer]
    if not storage.isdir(workdir):
        raise FileNotFoundError(f"The {name} work directory {workdir!r} does not exist. Train one with "
                                f"`{command.format(workdir=workdir)}`.")
    config = load_config(workdir)
    found = config.get("trainer")
    if found != trainer:
        raise ValueError(f"{workdir!r} is a work directory of the {found!r} trainer, not of a {name} run "
                         f"(its config.trainer must be {trainer!r}). Pass a run trained with "
                         f"`{command.format(workdir='DIR')}`.")
    if trainer == "seq2seq" and not any(storage.isfile(storage.join(workdir, f)) for f in TOKENIZER_FILES[:2]):
        raise FileNotFoundError(f"{storage.join(workdir, TOKENIZER_FILE)} does not exist: the run in {workdir!r} "
                                "stopped before it made its tokenizer. Resume it with "
                                f"`{command.format(workdir=workdir)}`.")
    return config


def checkpoint_step(workdir: str, trainer: str, step: int | None = None) -> int:
    """`step` (default: the newest) among the checkpoints of `workdir` that hold a usable model; fails, naming
    the fix, when there is none or `step` is not one of them. A reranker's params-only checkpoints do not count."""
    name, command = KINDS[trainer]
    steps = checkpointing.checkpoint_steps(workdir)
    if trainer == "captioner":
        steps = checkpointing.training_steps(storage.join(storage.abspath(workdir), "checkpoints"), steps)
    if not steps:
        raise FileNotFoundError(f"The {name} work directory {workdir!r} has no checkpoint in "
                                f"{storage.join(workdir, 'checkpoints')} yet. Train it (at least to its first "
                                f"checkpoint) with `{command.format(workdir=workdir)}`.")
    if step is None:
        return int(steps[-1])
    if step not in steps:
        raise ValueError(f"{workdir!r} has no checkpoint of step {step}; it has steps {steps}.")
    return int(step)


def default_mesh() -> Mesh:
    """Every local device on the data axis: the batch is split, the parameters replicated."""
    return parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), jax.local_devices())


def vqgan_workdir_of(workdir: str, config: ml_collections.ConfigDict, override: str | None = None) -> str:
    """The VQGAN work directory a seq2seq run was trained on (`override` when given); fails when it is missing."""
    path = override or config.get("vqgan_workdir")
    if not path or not storage.isdir(path):
        source = "vqgan_workdir" if override else f"config.vqgan_workdir of {workdir!r}"
        raise FileNotFoundError(
            f"The VQGAN work directory {path!r} ({source}) does not exist (relative paths are read from "
            f"{os.getcwd()!r}). Run from the directory the model was trained in, or name the VQGAN's work "
            "directory with vqgan_workdir= (sample.py: --vqgan_workdir).")
    return path


def _restore(workdir: str, step: int, abstract_params, shardings) -> dict:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, shardings)
    return checkpointing.restore_params(workdir, step, target)


def _restore_replicated(workdir: str, step: int, abstract_params, mesh: Mesh) -> dict:
    return _restore(workdir, step, abstract_params, jax.tree.map(lambda _: parallel.replicated(mesh), abstract_params))


def _merge(graphdef: nnx.GraphDef, params: dict, rng_state) -> nnx.Module:
    """The model of `graphdef` with `params`; its dropout streams filled afresh (inference never draws from them)."""
    return nnx.merge(graphdef, params, tl.fresh_rng_state(rng_state, jax.random.key(0)))


# The seq2seq model (DalleBart) and its tokenizer.

def load_tokenizer(workdir: str):
    """The run's sentencepiece `tokenizer.model`, or, in a work directory imported from min-dalle, its BPE
    `vocab.json` + `merges.txt` (same interface)."""
    if storage.isfile(storage.join(workdir, TOKENIZER_FILE)):
        return text_lib.TextTokenizer(storage.local_copy(storage.join(workdir, TOKENIZER_FILE), "tokenizer"))
    return min_dalle_tokenizer.MinDalleTokenizer(workdir)


def tokenizer_fingerprint(seq2seq_workdir: str) -> str:
    """sha256 over a seq2seq run's tokenizer files: two runs with equal fingerprints turn text into the same ids."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = storage.join(seq2seq_workdir, name)
        if storage.isfile(path):
            digest.update(name.encode() + storage.read_bytes(path))
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class LoadedSeq2Seq:
    """A seq2seq run restored from its work directory; `params` lie in `shardings` over `mesh`."""
    workdir: str
    config: ml_collections.ConfigDict
    tokenizer: Any  # text_lib.TextTokenizer or min_dalle_tokenizer.MinDalleTokenizer
    graphdef: nnx.GraphDef
    rng_state: Any  # shapes of the dropout streams, filled afresh by `model()`
    params: dict
    shardings: dict
    mesh: Mesh
    step: int

    def model(self, params: dict | None = None) -> DalleBart:
        """The model with `params` (default: the loaded ones)."""
        return _merge(self.graphdef, self.params if params is None else params, self.rng_state)

    @property
    def empty_text_ids(self) -> np.ndarray:
        return text_lib.empty_caption_ids(int(self.config.model.text_length))


def _abstract_seq2seq(model_config, mesh: Mesh, rules, model_class: type[DalleBart] = DalleBart):
    abstract = nnx.eval_shape(lambda: model_class(model_config, rngs=nnx.Rngs(params=0, dropout=0)))
    graphdef, params, rng_state = nnx.split(abstract, nnx.Param, ...)
    return graphdef, params, rng_state.to_pure_dict(), parallel.state_shardings(params, mesh, rules)


def load_seq2seq(workdir: str, mesh: Mesh | None = None, *, step: int | None = None) -> LoadedSeq2Seq:
    """Restores the run in `workdir` at `step` (default: its newest checkpoint) onto `mesh` (default:
    `default_mesh()`), its parameters sharded by the run's `config.sharding_rules`."""
    config = read_config(workdir, "seq2seq")
    step = checkpoint_step(workdir, "seq2seq", step)
    mesh = mesh if mesh is not None else default_mesh()
    model_class = extensions.model_class(config, DalleBart)
    model_class.validate_config(config.model)
    graphdef, abstract, rng_state, shardings = _abstract_seq2seq(config.model, mesh, config.sharding_rules,
                                                                 model_class)
    params = _restore(workdir, step, abstract.to_pure_dict(), shardings)
    if model_class is not DalleBart:  # sampled and exported in the plain layout, which computes the same
        config = ml_collections.ConfigDict(config.to_dict())
        config.model, params = model_class.dense_equivalent(config.model, params)
        # The plain model needs no class of an extension: a config rebuilt from this one builds what it holds.
        config.extensions = tuple(m.__name__ for m in extensions.load(config) if not hasattr(m, "model_class"))
        graphdef, _, rng_state, shardings = _abstract_seq2seq(config.model, mesh, config.sharding_rules)
        params = jax.device_put(params, shardings)
    return LoadedSeq2Seq(workdir=storage.abspath(workdir), config=config, tokenizer=load_tokenizer(workdir),
                         graphdef=graphdef, rng_state=rng_state, params=params, shardings=shardings, mesh=mesh,
                         step=step)


# The VQGAN.

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


def load_vqgan(workdir: str, mesh: Mesh | None = None, *, step: int | None = None) -> LoadedVQGAN:
    """Restores the VQGAN of `workdir` at `step` (default: its newest checkpoint), replicated over `mesh`
    (default: `default_mesh()`)."""
    config = read_config(workdir, "vqgan")
    step = checkpoint_step(workdir, "vqgan", step)
    mesh = mesh if mesh is not None else default_mesh()
    abstract_model = nnx.eval_shape(lambda: VQGAN(config.model, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(abstract_model, nnx.Param)
    params = _restore_replicated(workdir, step, abstract.to_pure_dict(), mesh)
    return LoadedVQGAN(workdir=storage.abspath(workdir), config=config, graphdef=graphdef, params=params,
                       step=step, fingerprint=vqgan_fingerprint(config.model, step, params),
                       grid_size=int(abstract_model.grid_size), codebook_size=int(abstract_model.codebook_size))


def decode_uint8(vqgan: LoadedVQGAN, params: dict, codes: jax.Array) -> jax.Array:
    """(N, grid*grid) codes -> uint8 (N, H, W, 3) through the decoder of `vqgan` with `params` (traceable, so
    callers compile it with what surrounds it)."""
    grid = codes.reshape(codes.shape[0], vqgan.grid_size, vqgan.grid_size)
    return gan_losses.to_uint8(nnx.merge(vqgan.graphdef, params).decode_code(grid))


def vqgan_fingerprint(model_config: ml_collections.ConfigDict, step: int, params: dict) -> str:
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


# The reranker (a caption model).

@dataclasses.dataclass(frozen=True)
class LoadedReranker:
    """A caption model restored from its work directory, replicated over the mesh it was loaded onto."""
    workdir: str
    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    rng_state: Any
    params: dict
    step: int

    def model(self, params: dict | None = None) -> Captioner:
        return _merge(self.graphdef, self.params if params is None else params, self.rng_state)


def load_reranker(workdir: str, mesh: Mesh | None = None, *, step: int | None = None) -> LoadedReranker:
    """Restores the caption model of `workdir` at `step` (default: its newest checkpoint), replicated over `mesh`."""
    config = read_config(workdir, "captioner")
    step = checkpoint_step(workdir, "captioner", step)
    mesh = mesh if mesh is not None else default_mesh()
    abstract_model = nnx.eval_shape(lambda: Captioner(config.model, rngs=nnx.Rngs(config.seed)))
    graphdef, abstract, rng_state = nnx.split(abstract_model, nnx.Param, ...)
    params = _restore_replicated(workdir, step, abstract.to_pure_dict(), mesh)
    return LoadedReranker(workdir=storage.abspath(workdir), config=config, graphdef=graphdef,
                          rng_state=rng_state.to_pure_dict(), params=params, step=step)


# Which reranker a seq2seq run samples with by default.

def register_reranker(seq2seq_workdir: str, reranker_workdir: str, step: int) -> str:
    """Records in `seq2seq_workdir/reranker.json` that the caption model in `reranker_workdir`, finished at `step`,
    is the run's reranker, replacing any earlier one; returns the file's path. Written by process 0 alone, whole or
    not at all (a temporary file renamed over the old one).

    The path is kept relative to the seq2seq run, so the two survive moving the directory that holds both (as
    `make demo`'s ROOT/dalle and ROOT/reranker); the absolute path is the fallback for a seq2seq run moved alone."""
    path = storage.join(seq2seq_workdir, RERANKER_FILE)
    if jax.process_index() != 0:
        return path
    absolute = storage.abspath(reranker_workdir)
    # A URL has no path relative to another place; a bucket's runs keep the reranker's URL.
    relative = absolute if storage.is_remote(absolute) or storage.is_remote(seq2seq_workdir) else \
        os.path.relpath(absolute, os.path.abspath(seq2seq_workdir))
    entry = dict(workdir=relative, absolute_workdir=absolute, step=int(step),
                 registered=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    storage.write_atomic(path, json.dumps(entry, indent=2) + "\n")
    return path


def registered_reranker(seq2seq_workdir: str) -> str | None:
    """The work directory of the reranker registered for the seq2seq run in `seq2seq_workdir`, None when none is.
    Fails, naming the file and how to stop using it, when the registered directory no longer exists."""
    path = storage.join(seq2seq_workdir, RERANKER_FILE)
    if not storage.isfile(path):
        return None
    stop = (f'Sample without a reranker with --reranker_workdir="" (reranker_workdir="" in Python), name another '
            f"with --reranker_workdir=DIR, or delete {path} to stop using one by default.")
    try:
        with storage.open(path) as f:
            entry = json.load(f)
        places = [entry["workdir"] if storage.is_remote(entry["workdir"]) else
                  os.path.normpath(os.path.join(seq2seq_workdir, entry["workdir"]))]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} does not register a reranker ({type(e).__name__}: {e}); training a reranker "
                         f"for this run writes it again. {stop}") from e
    if entry.get("absolute_workdir"):
        places.append(entry["absolute_workdir"])
    for place in places:
        if storage.isdir(place):
            return place
    also = f" (nor does {places[1]!r})" if storage.abspath(places[-1]) != storage.abspath(places[0]) else ""
    raise FileNotFoundError(f"{path} registers the reranker {places[0]!r} for this run, but it no longer "
                            f"exists{also}. Train one again with `dalle-jax-train --config shapes_captioner --workdir "
                            f"DIR --config.seq2seq_workdir={seq2seq_workdir}` (it registers itself when it "
                            f"finishes). {stop}")


def reranker_workdir_for(seq2seq_workdir: str, reranker_workdir: str | None) -> str | None:
    """The reranker sampling the run in `seq2seq_workdir` uses: `reranker_workdir` when it names one, none when it
    is "", and when it is None the one registered for the run (`registered_reranker`), if any."""
    if reranker_workdir is None:
        return registered_reranker(seq2seq_workdir)
    return reranker_workdir or None
