"""Research code a recipe adds to the trainers, named in `config.extensions` (module paths), never imported by the core.

A listed module defines any of these hooks; each is called at one place, with the config of the trainer whose
recipe lists the module:

- `check_config(config)`: every trainer, before any work; fails on the settings the extension owns, naming the
  field and the fix.
- `model_class(model_config)`: the seq2seq trainer and `runs.load_seq2seq`; the DalleBart subclass to build. The
  loader turns its parameters into a plain DalleBart's with the class's `dense_equivalent(model_config, params)`,
  so inference and export only ever see the plain layout.
- `init_params(config, params, train_records)`: the seq2seq trainer, on a run starting from scratch; its fresh
  parameters (pure dict) -> the parameters to start from.
- `train_caption(config)`: the seq2seq trainer; None, or `caption(example) -> str | None`, a caption that replaces
  the drawn one of a training example (None: keep the drawn one). The example carries its stream position under
  `pipeline.STREAM_INDEX`.
- `evaluate_reconstructions(config, source, images)`: the VQGAN trainer's final test pass; `images` are the
  reconstructions of `source`'s first examples, in order -> figures to report.
- `code_feature_width(seq2seq_config)` and `code_feature_table(seq2seq_config, train_records)`: the captioner
  trainer, for a model with `config.model.reads="code_features"`: the width of the per-code feature table and, on a
  run starting from scratch, the table itself.
- `contrast_captions(record)`: the captioner trainer; a record's canonical caption followed by captions that differ
  from it only in which object is which (None where one does not exist), or []; evaluation reports how often the
  first is the likeliest (`twin_accuracy`).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

import ml_collections


def load(config: ml_collections.ConfigDict) -> tuple[ModuleType, ...]:
    """The modules `config.extensions` names, imported."""
    modules = []
    for name in config.extensions:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            raise ValueError(f"config.extensions names {name!r}, which cannot be imported ({e}); list module paths "
                             "such as 'dalle_jax.shapes.left_or_above', or drop the entry.") from e
    return tuple(modules)


def hooks(config: ml_collections.ConfigDict, name: str) -> list[Callable]:
    """Every listed module's hook `name`, in the order of `config.extensions`."""
    return [getattr(m, name) for m in load(config) if hasattr(m, name)]


def one_hook(config: ml_collections.ConfigDict, name: str) -> Callable | None:
    """The one listed module's hook `name`, or None; two modules defining it fail."""
    found = [m.__name__ for m in load(config) if hasattr(m, name)]
    if len(found) > 1:
        raise ValueError(f"config.extensions lists {found}, which all define {name!r}; keep one of them.")
    return getattr(importlib.import_module(found[0]), name) if found else None


def model_class(config: ml_collections.ConfigDict, default: type) -> type:
    """The class the one listed `model_class` hook gives for `config.model`, else `default`."""
    hook = one_hook(config, "model_class")
    return default if hook is None else hook(config.model)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Runs every listed module's `check_config`."""
    for check in hooks(config, "check_config"):
        check(config)
