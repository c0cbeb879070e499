"""Times the VQGAN train step: `python bench/vqgan_step.py [--config shapes_vqgan] [--steps 10]`.

Prints the compile time, the median step time, images/s and the compiler's FLOP count; the final line is one JSON
object. The step is measured with the GAN terms on (the most expensive phase) and off.
"""
import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dalle_jax import parallel, recipes  # noqa: E402
from dalle_jax.trainers import vqgan_step  # noqa: E402
from dalle_jax.training import throughput  # noqa: E402




def measure(config, steps: int, gan_on: bool) -> dict:
    config = config.copy_and_resolve_references()
    config.loss.disc_start = 0 if gan_on else config.num_steps
    mesh = parallel.make_mesh(config.mesh)
    setup, state, shardings = vqgan_step.create(config, mesh)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    batch = parallel.global_batch(
        {"image": rng.integers(0, 256, (config.data.batch_size, size, size, 3), dtype=np.uint8)}, mesh)
    step_fn = jax.jit(functools.partial(vqgan_step.train_step, setup),
                      in_shardings=(shardings, parallel.batch_sharding(mesh)),
                      out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return dict(gan_on=gan_on, compile_s=compile_s, step_s=median, images_per_s=config.data.batch_size / median,
                gflop_per_step=flops / 1e9, gflop_per_s=flops / 1e9 / median)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="shapes_vqgan")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    config = recipes.load(args.config)
    peak = throughput.matmul_peak_flops() / 1e9
    results = [measure(config, args.steps, gan_on) for gan_on in (False, True)]
    print(f"f32 matmul peak measured here: {peak:.1f} GFLOP/s")
    for r in results:
        r["fraction_of_matmul_peak"] = r["gflop_per_s"] / peak
        print(f"gan {'on ' if r['gan_on'] else 'off'}: step {r['step_s'] * 1e3:.1f} ms (median of {args.steps}), "
              f"{r['images_per_s']:.1f} images/s, {r['gflop_per_step']:.2f} GFLOP/step, "
              f"{r['gflop_per_s']:.1f} GFLOP/s = {r['fraction_of_matmul_peak']:.0%} of the matmul peak, "
              f"compile {r['compile_s']:.1f} s")
    print(json.dumps(dict(benchmark="vqgan_step", config=args.config, batch_size=config.data.batch_size,
                          matmul_peak_gflop_per_s=peak,
                          devices=jax.device_count(), platform=jax.devices()[0].platform,
                          machine=f"{platform.machine()} x{os.cpu_count()}", results=results)))


if __name__ == "__main__":
    main()
