"""Device mesh, logical-axis rules, and the sharding of model states and batches.

Parameters carry logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); one rules table in the
config maps those names onto the mesh axes `data`, `fsdp`, `tensor`. A dimension that a mesh axis does not
divide is left unsharded along that axis, so a 3-channel conv or a 6-way head split still works on 8 devices.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of every global array is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves `mesh.data/fsdp/tensor` (one may be -1: the remaining devices) against the device count."""
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one of config.mesh.data/fsdp/tensor may be -1; got {sizes}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh sizes must be positive or -1; got data,fsdp,tensor = {sizes}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"config.mesh (data,fsdp,tensor = {sizes}) cannot fill {num_devices} devices: {known} does not "
                f"divide {num_devices}. Choose sizes whose product divides the device count.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh (data,fsdp,tensor = {sizes}) needs {math.prod(sizes)} devices but {num_devices} are "
            f"available. Set the sizes so their product is {num_devices}, or set one of them to -1.")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh) -> P:
    """Maps a parameter's logical axis names onto mesh axes, skipping axes that do not divide the dimension."""
    table: Mapping[str, Any] = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        for axis in axes:
            if axis in used or mesh.shape[axis] == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules) -> dict:
    """Pure dict of NamedShardings, one per variable of an (abstract) NNX state."""
    def sharding(v: nnx.Variable):
        found = v.get_metadata().get("out_sharding") or v.get_metadata().get("sharding_names")
        shape = np.shape(v.value)
        names = tuple(found) if found else (None,) * len(shape)
        return nnx.Variable(NamedSharding(mesh, logical_to_spec(names, shape, rules, mesh)))
    return nnx.State(jax.tree.map(sharding, abstract_state, is_leaf=_is_variable)).to_pure_dict()


def optimizer_shardings(tx, abstract_opt_state, param_shardings, mesh: Mesh):
    """Shards optimizer moments like the parameters they track; everything else (counts, scalars) replicated.

    A moment whose shape differs from its parameter's (Adafactor's factored rows and columns, or its (1,)
    placeholders) is replicated when the parameter's sharding does not fit it: those are O(rows + columns) small.
    """
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx, lambda moment, s: s if _sharding_fits(s, np.shape(moment)) else replicated, abstract_opt_state,
        param_shardings, transform_non_params=lambda _: replicated)


def _sharding_fits(sharding: NamedSharding, shape: Sequence[int]) -> bool:
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        return False
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if dim % math.prod(sharding.mesh.shape[a] for a in axes):
            return False
    return True


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_parallelism(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_global_batch(global_batch: int, mesh: Mesh, field: str = "config.data.batch_size") -> None:
    ways = batch_parallelism(mesh)
    if global_batch % ways:
        raise ValueError(
            f"{field}={global_batch} is not divisible by the data-parallel size {ways} (mesh data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']}). Use a multiple of {ways}.")
    if global_batch % jax.process_count():
        raise ValueError(f"{field}={global_batch} is not divisible by the process count {jax.process_count()}.")


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Assembles each process's slice of the batch into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def jit_sharded_step(step_fn: Callable, state_shardings, mesh: Mesh, tpu_compiler_options=None):
    """`step_fn(state, batch) -> (state, metrics)` compiled with explicit shardings: state as `state_shardings`
    (donated, updated in place), batch split over the batch axes, metrics replicated. `tpu_compiler_options`
    (libtpu's XLA flags, e.g. {"xla_tpu_enable_windowed_einsum_for_all_gather": False}) apply on TPU meshes
    only, real or compile-only; other backends do not know them."""
    on_tpu = mesh.devices.flat[0].platform == "tpu"
    options = dict(tpu_compiler_options) if on_tpu and tpu_compiler_options else None
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0, compiler_options=options)


def init_sharded(init_fn: Callable[[], Any], shardings) -> Any:
    """Runs `init_fn` under jit so every array is created directly in its final sharding."""
    # An init program runs once, but XLA:CPU optimises each parameter's random-number kernel as if it ran often:
    # the tiny VQGAN's init compiles in 5.5 s at LLVM level 0 against 33 s by default. Training programs keep the
    # default level.
    # Under a trace (`aot.abstract_state` takes a trainer's state shapes by eval_shape) the jit is nested, and
    # nested jits take no compiler options; nothing is compiled there anyway.
    fast_compile = _on_cpu(shardings) and not _tracing()
    options = {"xla_backend_optimization_level": 0} if fast_compile else None
    return jax.jit(init_fn, out_shardings=shardings, compiler_options=options)()


def _on_cpu(shardings) -> bool:
    return all(d.platform == "cpu" for s in jax.tree.leaves(shardings) for d in s.device_set)


def _tracing() -> bool:
    """True inside jit, eval_shape and other traces, where every operation, even on constants, yields a tracer."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


_activation_rules: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
    """While active (around the tracing of a step), `constrain` pins activations to the rules' mesh axes."""
    _activation_rules.append((mesh, rules))
    try:
        yield
    finally:
        _activation_rules.pop()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Shards an activation by its logical axis names under `activation_sharding`; a no-op outside it."""
    if not _activation_rules:
        return x
    mesh, rules = _activation_rules[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, rules, mesh)))
