"""Compiles every pod recipe for its TPU topologies on this machine and prints the AOT figures:
`.venv-tpu/bin/python bench/aot_pod.py [--only dalle_mega]` (needs `make tpu-venv`; about 22 minutes on 2 cores:
a DALL·E compile takes 2-4 minutes, the VQGAN's 12). `--hlo_dir DIR` also keeps each compiled step's HLO.

For each recipe and topology: per-chip memory against HBM, matmul FLOPs, the estimated compute and communication
times, the step time and MFU between their full overlap and none, and the instructions that carry no cycle figure
(see dalle_jax/pods/aot.py for how each figure is obtained); the final line is one JSON object with every report.
"""
import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle_jax.pods import aot

RECIPES = (
    ("dalle_mini", "v5e:4x4"),
    ("dalle_mega", "v5e:16x16"),
    ("dalle_mega", "v4:4x4x4"),
    ("vqgan_f16_16384", "v5e:8x8"),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="Only recipes whose config name contains this.")
    parser.add_argument("--hlo_dir", default="", help="Also write each compiled step's HLO text here.")
    args = parser.parse_args()
    reports = []
    for name, topology in RECIPES:
        if args.only not in name:
            continue
        config = importlib.import_module(f"dalle_jax.configs.{name}").get_config("")
        hlo_path = os.path.join(args.hlo_dir, f"{name}_{topology.replace(':', '_')}.hlo.txt") if args.hlo_dir else None
        report = aot.compile_for_topology(config, topology, hlo_path=hlo_path)
        print(f"{name}: {report.text()}", flush=True)
        reports.append(dict(config=name, **report.as_dict()))
    print(json.dumps({"reports": reports}))


if __name__ == "__main__":
    main()
