"""Loads a trained seq2seq (DalleBart) run from its work directory: config, tokenizer and parameters.

Only the parameters are read from the checkpoint (a partial restore of its "state" item): the optimizer states
and the data iterator stay on disk. They are restored straight into the shardings the trainer's setup gives them
on the mesh they are loaded onto, without an initialised model being built first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from dalle_jax import parallel
from dalle_jax.data import text as text_lib
from dalle_jax.interop import min_dalle_tokenizer
from dalle_jax.models import dalle_bart
from dalle_jax.models.dalle_bart import DalleBart
from dalle_jax.trainers import seq2seq_step, text_stage
from dalle_jax.training import checkpointing, workdir as workdir_lib

TOKENIZER_FILES = (text_stage.TOKENIZER_FILE, min_dalle_tokenizer.VOCAB_FILE, min_dalle_tokenizer.MERGES_FILE)
TRAIN_COMMAND = ("python train.py --config configs/shapes_dalle.py --workdir {workdir} "
                 "--config.vqgan_workdir=runs/vqgan")


@dataclasses.dataclass(frozen=True)
class LoadedSeq2Seq:
    """A seq2seq run restored from its work directory; `params` lie in `shardings` over `setup.mesh`."""
    workdir: str
    config: ml_collections.ConfigDict
    tokenizer: text_lib.TextTokenizer | min_dalle_tokenizer.MinDalleTokenizer
    setup: seq2seq_step.Setup
    params: dict
    shardings: dict
    step: int

    def model(self) -> DalleBart:
        return self.setup.model(self.params)


def default_mesh() -> Mesh:
    """Every local device on the data axis: the batch is split, the (small) parameters replicated."""
    return parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), jax.local_devices())


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config, after checking that `workdir` is a seq2seq work directory with a tokenizer."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"Seq2seq work directory {workdir!r} does not exist. Train one with "
                                f"`{TRAIN_COMMAND.format(workdir=workdir)}`.")
    config = workdir_lib.load_config(workdir)
    trainer = config.get("trainer")
    if trainer != "seq2seq":
        raise ValueError(f"{workdir!r} is a work directory of the {trainer!r} trainer, not of a seq2seq model "
                         "(its config.trainer must be 'seq2seq'). Pass the work directory of a run trained with "
                         "configs/shapes_dalle.py (or another seq2seq recipe).")
    tokenizer_path = os.path.join(workdir, text_stage.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path) and not min_dalle_tokenizer.has_files(workdir):
        raise FileNotFoundError(f"{tokenizer_path} does not exist: the run in {workdir!r} stopped before it made "
                                f"its tokenizer. Resume it with `{TRAIN_COMMAND.format(workdir=workdir)}`.")
    return config


def load_tokenizer(workdir: str):
    """The run's sentencepiece `tokenizer.model`, or, in a work directory imported from min-dalle, its BPE
    `vocab.json` + `merges.txt` (same interface)."""
    if os.path.isfile(os.path.join(workdir, text_stage.TOKENIZER_FILE)):
        return text_lib.TextTokenizer(os.path.join(workdir, text_stage.TOKENIZER_FILE))
    return min_dalle_tokenizer.MinDalleTokenizer(workdir)


def tokenizer_fingerprint(seq2seq_workdir: str) -> str:
    """sha256 over a seq2seq run's tokenizer files: two runs with equal fingerprints turn text into the same ids."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = os.path.join(seq2seq_workdir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the complete checkpoints in `workdir`, oldest first; raises if there are none."""
    steps = checkpointing.checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"The seq2seq work directory {workdir!r} has no checkpoint in "
                                f"{os.path.join(workdir, 'checkpoints')} yet. Train it (at least to its first "
                                f"checkpoint) with `{TRAIN_COMMAND.format(workdir=workdir)}`.")
    return steps


def load_seq2seq(workdir: str, mesh: Mesh | None = None, *, step: int | None = None) -> LoadedSeq2Seq:
    """Restores the run in `workdir` at `step` (default: its newest checkpoint) onto `mesh` (default:
    `default_mesh()`), with its parameters sharded by the run's `config.sharding_rules`.

    The run's own `config.mesh` is not used: it may name more devices than the machine loading the model has.
    """
    config = read_config(workdir)
    steps = checkpoint_steps(workdir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{workdir!r} has no checkpoint of step {step}; it has steps {steps}.")
    mesh = mesh if mesh is not None else default_mesh()
    tokenizer = load_tokenizer(workdir)
    setup, _, shardings = seq2seq_step.create(config, mesh, initialize=False)

    abstract_model = nnx.eval_shape(lambda: DalleBart(config.model, rngs=nnx.Rngs(params=0, dropout=0)))
    abstract_params = nnx.state(abstract_model, nnx.Param).to_pure_dict()
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params,
                          shardings["params"])
    params = checkpointing.restore_params(workdir, step, target)
    if dalle_bart.code_features(config.model):  # sampled and exported in the plain layout, which computes the same
        config = ml_collections.ConfigDict(config.to_dict())
        config.model, params = dalle_bart.dense_equivalent(config.model, params)
        setup, _, shardings = seq2seq_step.create(config, mesh, initialize=False)
        params = jax.device_put(params, shardings["params"])
    return LoadedSeq2Seq(workdir=os.path.abspath(workdir), config=config, tokenizer=tokenizer, setup=setup,
                         params=params, shardings=shardings["params"], step=int(step))
