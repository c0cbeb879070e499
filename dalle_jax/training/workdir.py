"""The work directory's config record: written at start, read by later stages (sampling, encoding, export)."""
from __future__ import annotations

import json
import os

import jax
import ml_collections


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a dalle_jax work directory "
                                "(train.py writes config.json there when a run starts).")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
