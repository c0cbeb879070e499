"""Where the evaluation commands write their JSON reports."""
from __future__ import annotations

import json
import os


def write_report(path: str, report: dict) -> None:
    """Writes `report` as indented JSON to `path`, creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
