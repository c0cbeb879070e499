"""Where the evaluation commands write their JSON reports (a local path or a bucket URL)."""
from __future__ import annotations

import json

from dalle_jax import storage


def write_report(path: str, report: dict) -> None:
    """Writes `report` as indented JSON to `path`, creating its directory."""
    storage.makedirs(storage.dirname(storage.abspath(path)))
    storage.write_atomic(path, json.dumps(report, indent=2) + "\n")
