"""Mesh construction and the logical-axis rules."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dalle_jax import parallel


def mesh_cfg(data, fsdp, tensor):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_shape_fills_minus_one():
    assert parallel.mesh_shape(mesh_cfg(-1, 2, 2), 8) == (2, 2, 2)
    assert parallel.mesh_shape(mesh_cfg(1, -1, 1), 8) == (1, 8, 1)


@pytest.mark.parametrize("sizes,devices,needle", [
    ((2, 2, 2), 4, "needs 8 devices but 4"),
    ((-1, 3, 1), 8, "3 does not divide 8"),
    ((-1, -1, 1), 8, "At most one"),
    ((0, 1, 1), 1, "positive or -1"),
])
def test_mesh_shape_errors_name_the_fields(sizes, devices, needle):
    with pytest.raises(ValueError, match="config.mesh|At most one") as err:
        parallel.mesh_shape(mesh_cfg(*sizes), devices)
    assert needle in str(err.value)


class FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


def test_logical_to_spec_maps_and_skips_indivisible_axes():
    mesh = FakeMesh(data=2, fsdp=2, tensor=2)
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("conv_out", ("fsdp", "tensor")), ("batch", ("data", "fsdp")))
    assert parallel.logical_to_spec(("embed", "mlp"), (8, 16), rules, mesh) == P("fsdp", "tensor")
    # 6 channels: divisible by fsdp (2) but not by fsdp x tensor (4).
    assert parallel.logical_to_spec((None, None, None, "conv_out"), (3, 3, 3, 6), rules, mesh) == P(
        None, None, None, "fsdp")
    # 3 channels: nothing divides; replicated along that dimension.
    assert parallel.logical_to_spec((None, "conv_out"), (4, 3), rules, mesh) == P(None, None)
    # A mesh axis is used at most once per array.
    assert parallel.logical_to_spec(("embed", "embed"), (4, 4), rules, mesh) == P("fsdp", None)
    # Unknown names and size-1 mesh axes shard nothing.
    assert parallel.logical_to_spec(("unknown",), (4,), rules, FakeMesh(data=8, fsdp=1, tensor=1)) == P(None)


def test_check_global_batch_names_the_field():
    mesh = parallel.make_mesh(mesh_cfg(1, 1, 1))
    parallel.check_global_batch(3, mesh)
    with pytest.raises(ValueError, match="config.data.batch_size=3"):
        parallel.check_global_batch(3, FakeMeshWithBatch(4))


class FakeMeshWithBatch(FakeMesh):
    def __init__(self, ways):
        super().__init__(data=ways, fsdp=1, tensor=1)


def test_global_batch_round_trip_on_one_device():
    mesh = parallel.make_mesh(mesh_cfg(-1, 1, 1))
    local = {"image": np.arange(24, dtype=np.uint8).reshape(2, 3, 4)}
    out = parallel.global_batch(local, mesh)
    np.testing.assert_array_equal(jax.device_get(out["image"]), local["image"])


def test_tpu_compiler_options_are_left_out_on_other_backends():
    """XLA:CPU refuses libtpu's flags, so a recipe that sets them still trains on CPU meshes."""
    options = {"xla_tpu_enable_windowed_einsum_for_all_gather": False}
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(lambda x: x + 1, compiler_options=options)(jnp.ones(2))
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), jax.devices()[:1])
    state_sharding = parallel.replicated(mesh)
    step = parallel.jit_sharded_step(lambda state, batch: (state + batch["x"].sum(), {"n": state}), state_sharding,
                                     mesh, options)
    state, metrics = step(jnp.zeros(()), {"x": jnp.ones((4,))})
    assert float(state) == 4.0 and float(metrics["n"]) == 0.0
