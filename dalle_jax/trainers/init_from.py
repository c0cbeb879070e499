"""Where a run's first parameters come from when it has no training checkpoint yet.

Two sources replace the random initialisation: weights imported into the run's own work directory (a params-only
checkpoint, written by `dalle_jax.interop.import_weights`), or `config.init_from`, another work directory (imported or
trained) whose newest parameters a fresh work directory starts from. Either way the optimizer state is fresh and
every later checkpoint is a full one, so resuming works as for any run. The run's config must build the same
architecture as the source's `config.json`; any model field that differs fails before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections

from dalle_jax.training import checkpointing
from dalle_jax import runs, storage

# Model fields a fine-tuning run may change: they alter computation or memory, not the parameters' shapes.
FREE_MODEL_FIELDS = {"seq2seq": ("dtype", "param_dtype", "remat", "dropout"), "vqgan": ("dtype", "dropout")}
# The text tokenizer's files: a seq2seq model's text embeddings only mean something with the ids they came from.
TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt")


@dataclasses.dataclass(frozen=True)
class Start:
    """Parameters to start from: checkpoint `step` of `workdir`; the run then counts from `first_step`."""
    workdir: str
    step: int
    first_step: int


def find_start(config: ml_collections.ConfigDict, workdir: str) -> Start | None:
    """The source of the run's first parameters, checked against `config`; None when the run resumes from its own
    training checkpoint or starts from random parameters. Call it before the run's config.json is written."""
    directory = storage.join(storage.abspath(workdir), "checkpoints")
    steps = checkpointing.checkpoint_steps(workdir)
    trained = checkpointing.training_steps(directory, steps)
    imported = [s for s in steps if s not in trained]
    source = config.init_from
    if trained:  # a started run resumes; where its first parameters came from no longer matters
        return None
    if source and imported:
        raise ValueError(f"{workdir!r} holds imported weights (checkpoint step {imported[-1]}) and "
                         f"config.init_from={source!r} names other ones; drop --config.init_from to fine-tune the "
                         "imported weights, or use a new --workdir.")
    if imported:
        check_matches(config, runs.load_config(workdir), workdir)
        return Start(storage.abspath(workdir), imported[-1], imported[-1])
    if not source:
        return None
    if storage.abspath(source) == storage.abspath(workdir):
        raise ValueError(f"config.init_from={source!r} is the run's own --workdir; name another work directory.")
    source_steps = checkpointing.checkpoint_steps(source) if storage.isdir(source) else []
    if not source_steps:
        raise FileNotFoundError(f"config.init_from={source!r} has no checkpoint in "
                                f"{storage.join(source, 'checkpoints')}; name a trained or imported work directory.")
    check_matches(config, runs.load_config(source), source)
    if config.trainer == "seq2seq":
        _copy_tokenizer(source, workdir)
    return Start(storage.abspath(source), source_steps[-1], 0)


def check_matches(config: ml_collections.ConfigDict, source_config: ml_collections.ConfigDict, source: str) -> None:
    """Raises naming every model field where `config` builds another architecture than the weights in `source`."""
    where = f"the weights in {source!r} (its config.json)"
    if source_config.get("trainer") != config.trainer:
        raise ValueError(f"{where} are of the {source_config.get('trainer')!r} trainer, but this run's "
                         f"config.trainer={config.trainer!r}; use a {source_config.get('trainer')} recipe with them.")
    if source_config.get("decode_only"):
        raise ValueError(f"{where} are a decode-only VQGAN (imported without an encoder, whose parameters are NaN); "
                         "it cannot be trained. Import a VQGAN with its encoder, e.g. taming-transformers' checkpoint "
                         "with `python -m dalle_jax.interop.import_weights --format taming`.")
    free = FREE_MODEL_FIELDS.get(config.trainer, ())
    problems = []
    for name, theirs in sorted(source_config.model.items()):
        if name in free:
            continue
        if name not in config.model:
            problems.append(f"model.{name}={theirs!r} there is not a field of this run's config; use a recipe of "
                            "this dalle_jax version that has it.")
            continue
        problems += _mismatch(name, config.model[name], theirs, where)
    if problems:
        raise ValueError(f"The config does not build the architecture of the weights in {source!r}:\n  "
                         + "\n  ".join(problems))


def load_params(start: Start, state: dict, shardings: dict) -> tuple[dict, int]:
    """`state` (freshly initialised) with its parameters replaced by the source's, restored straight into their
    shardings; its step is `start.first_step`. The optimizer state stays as initialised."""
    logging.info("Starting from the parameters of checkpoint %d in %s", start.step, start.workdir)
    target = checkpointing.abstract_like(state["params"], shardings["params"])
    params = checkpointing.restore_params(start.workdir, start.step, target)
    step = jax.jit(lambda s: jnp.full_like(s, start.first_step), out_shardings=shardings["step"])(state["step"])
    return dict(state, params=params, step=step), start.first_step


def _copy_tokenizer(source: str, workdir: str) -> None:
    """The source's tokenizer files, into a work directory that has none yet (process 0 writes)."""
    present = [f for f in TOKENIZER_FILES if storage.isfile(storage.join(workdir, f))]
    if present or jax.process_index() != 0:
        return
    storage.makedirs(workdir)
    for name in TOKENIZER_FILES:
        if storage.isfile(storage.join(source, name)):
            storage.copyfile(storage.join(source, name), storage.join(workdir, name + ".tmp"))
            storage.replace(storage.join(workdir, name + ".tmp"), storage.join(workdir, name))


def _mismatch(name: str, mine, theirs, where: str) -> list[str]:
    if _plain(mine) == _plain(theirs):
        return []
    return [f"config.model.{name}={_flag_value(mine)} but {where} have {_flag_value(theirs)}: pass "
            f"--config.model.{name}={_flag_value(theirs)}"]


def _plain(value):
    """Tuples and lists alike (config.json stores tuples as lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _flag_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)
