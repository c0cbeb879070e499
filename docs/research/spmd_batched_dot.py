"""Minimal reproduction: XLA's SPMD partitioner (jax 0.10.2, Shardy and GSPMD alike) returns a batched dot's rows on
the wrong devices when the operands' batch dimension is split over one mesh axis, their contracting dimension
over the two others, and the result's batch dimension over two axes.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python docs/research/spmd_batched_dot.py

prints, for each layout, the largest error against the unsharded result (see spmd_batched_dot.md).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

mesh = jax.make_mesh((2, 2, 2), ("a", "b", "c"), axis_types=(AxisType.Auto,) * 3)
x = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4) ** 2
y = jnp.ones((8, 4), jnp.float32)
expected = np.asarray(jnp.sum(x * y, axis=1))


def batched_dot(in_spec, out_spec):
    """einsum("bc,bc->b") (a dot_general with batch dimension b) compiled with the given shardings."""
    s = NamedSharding(mesh, P(*in_spec))
    f = jax.jit(lambda u, v: jnp.einsum("bc,bc->b", u, v), in_shardings=(s, s),
                out_shardings=NamedSharding(mesh, P(out_spec)))
    return np.asarray(f(x, y))


if __name__ == "__main__":
    layouts = [
        # The failing pattern: batch over a, contraction over (b, c), result's batch over (a, b).
        (("a", ("b", "c")), ("a", "b")),
        # The same operands with the result's batch over a alone, or over all three axes: right.
        (("a", ("b", "c")), "a"),
        (("a", ("b", "c")), ("a", "b", "c")),
        # The layout the VQGAN pins (batch over data x fsdp, channels over tensor): right.
        ((("a", "b"), "c"), ("a", "b")),
    ]
    for in_spec, out_spec in layouts:
        got = batched_dot(in_spec, out_spec)
        print(f"operands {str(in_spec):22s} result {str(out_spec):18s} max error {np.max(np.abs(got - expected)):8.1f}"
              f"   {got.astype(int).tolist()}")
    print(f"expected{'':62s}{expected.astype(int).tolist()}")
