"""How fast this machine multiplies matrices: the yardstick for model FLOPs utilisation (MFU)."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def matmul_peak_flops(size: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """FLOP/s of one device's dense `size x size` matmul, measured here (median of `repeats`)."""
    a = jnp.ones((size, size), dtype, device=jax.local_devices()[0])
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def mfu(model_flops_per_step: float, steps_per_s: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs actually done per second over what all devices could do at their measured peak."""
    return model_flops_per_step * steps_per_s / (peak_flops_per_device * devices)
