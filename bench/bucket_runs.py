"""What a gs:// work directory and dataset cost against local ones, measured in the same run:
`python bench/bucket_runs.py [--rounds 3] [--steps 24]`.

Each round trains the tiny VQGAN (`shapes_vqgan:tiny`, checkpoints every 4 steps) twice in fresh processes: once
with a local work directory and data_dir, once with both in a GCS bucket served on 127.0.0.1 (gcp-storage-emulator
behind the tests' proxy, tests/storage/gcs_server.py), each with an empty scratch directory, so the bucket run
stages the dataset anew. The order alternates between rounds, and a first unmeasured run of each fills the
compilation cache. Figures: wall seconds of each run, the median of each side, the extra seconds and ratio of the
bucket side, and the bytes uploaded per bucket run. What it leaves out: a real bucket's latency and bandwidth (the
emulator is local and in memory), and credentials. The final line is one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.storage.gcs_server import GcsServer  # noqa: E402


def train(workdir: str, data_dir: str, steps: int, env: dict) -> float:
    command = [sys.executable, os.path.join(REPO, "train.py"), "--config=shapes_vqgan:tiny", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", f"--config.num_steps={steps}", "--config.checkpoint_every=4",
               f"--config.eval_every={steps}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bucket_bench_")
    server = GcsServer("bench")
    base = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                JAX_COMPILATION_CACHE_DIR=os.path.join(root, "xla_cache"))
    local_data = os.path.join(root, "tfds")
    times = {"local": [], "bucket": []}
    uploaded = []
    try:
        for run in range(args.rounds + 1):  # run 0 fills the compilation cache and is not measured
            for side in (("local", "bucket") if run % 2 else ("bucket", "local")):
                env = dict(base, DALLE_JAX_SCRATCH=os.path.join(root, f"scratch_{side}_{run}"))
                if side == "local":
                    seconds = train(os.path.join(root, f"local_{run}"), local_data, args.steps, env)
                else:
                    before = server.proxy.uploaded_bytes
                    seconds = train(f"gs://bench/run_{run}", f"gs://bench/tfds_{run}", args.steps,
                                    dict(env, **server.env()))
                    if run:
                        uploaded.append(server.proxy.uploaded_bytes - before)
                if run:
                    times[side].append(seconds)
                    print(f"round {run} {side}: {seconds:.1f} s", flush=True)
    finally:
        server.close()
    local, bucket = statistics.median(times["local"]), statistics.median(times["bucket"])
    result = dict(steps=args.steps, rounds=args.rounds, local_s=[round(t, 2) for t in times["local"]],
                  bucket_s=[round(t, 2) for t in times["bucket"]], local_median_s=round(local, 2),
                  bucket_median_s=round(bucket, 2), extra_s=round(bucket - local, 2), ratio=round(bucket / local, 3),
                  uploaded_bytes_per_run=int(statistics.median(uploaded)))
    print(f"bucket {bucket:.1f} s against local {local:.1f} s (median of {args.rounds}): {bucket - local:+.1f} s, "
          f"x{bucket / local:.2f}; {result['uploaded_bytes_per_run']} bytes uploaded per bucket run")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
