"""Which of `make demo`'s earlier training runs can be kept: one trained with the current recipe, after the run it
learned from. Any other run is moved aside (never deleted), so its stage trains afresh instead of resuming a
checkpoint of another model.
"""
from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

# Read when sampling, not when training: a change there leaves the trained weights valid.
_SAMPLING_ONLY = ("sampling",)
_CONFIG, _FINAL = "config.json", "test_metrics.json"


def changed_fields(workdir: str, recipe: ml_collections.ConfigDict) -> dict:
    """{field: (recipe's value, the run's value)} for each setting of `recipe` that the run in `workdir` was not
    trained with. A setting the recipe leaves empty (0, "" or None) is filled in by its trainer and not compared;
    one missing from the run's config shows as None."""
    with open(os.path.join(workdir, _CONFIG)) as f:
        trained = _flatten(json.load(f))
    changed = {}
    for field, value in _flatten(json.loads(recipe.to_json_best_effort())).items():
        if field.split(".")[0] in _SAMPLING_ONLY or value in (0, "", None):
            continue
        if trained.get(field) != value:
            changed[field] = (value, trained.get(field))
    return changed


def keep_or_move_aside(workdir: str, recipe: ml_collections.ConfigDict, *, upstream_kept: bool = True) -> bool:
    """True when `workdir` holds a finished run of `recipe` whose upstream run (the one it learned from) is kept.

    A run of another recipe, or any run when `upstream_kept` is False (its upstream trains again), is renamed to
    `workdir.replaced-TIME` and False returned: its stage then trains from scratch. An unfinished run of `recipe`
    stays, to be resumed.
    """
    if not os.path.exists(workdir):
        return False
    if not os.path.exists(os.path.join(workdir, _CONFIG)):
        reasons = ["it holds no config.json"]
    else:
        reasons = [f"{field}: {was!r} -> {now!r}" for field, (now, was) in changed_fields(workdir, recipe).items()]
    if not upstream_kept:
        reasons.append("the run it learned from trains again")
    if reasons:
        aside = f"{workdir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        while os.path.exists(aside):
            aside += "+"
        os.replace(workdir, aside)
        logging.warning("demo: %s is not a run of the current recipe (%s); moved it to %s, to be trained again.",
                        workdir, "; ".join(reasons), aside)
        return False
    final = os.path.join(workdir, _FINAL)
    if not os.path.exists(final):
        return False
    with open(final) as f:
        return json.load(f).get("step") == recipe.num_steps


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
