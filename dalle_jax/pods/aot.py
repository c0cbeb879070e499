"""Ahead-of-time compilation of a trainer's train step for a TPU pod topology, on any machine with libtpu.

`compile_for_topology(config, "v5e:16x16")` builds the pod's (compile-only) devices, the config's mesh over them,
the sharded abstract state and batch, and compiles exactly the step `train.py` would run there. The report holds
XLA's per-chip memory (arguments, outputs, temporaries, code) against the chip's HBM, the compiler's FLOPs, an
estimate of the step's compute time (the TPU compiler's cost model) and of its communication time (`communication`:
the collectives' bytes at the interconnect's bandwidth), and the step time and model FLOPs utilisation between
those two overlapping fully and not at all.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import ml_collections

from dalle_jax import parallel
from dalle_jax.pods import communication, tpu_cycles

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_flops: float  # dense bf16 FLOP/s of one chip
    hbm_bytes: int  # HBM of one chip
    hbm_bytes_per_s: float  # HBM bandwidth of one chip
    clock_hz: float  # TensorCore clock: peak = cores x 4 MXUs x MXU multiply-adds x 2 x clock
    interconnect: communication.Interconnect  # inter-chip (ICI) links: one's one-way bandwidth, how many
    megacore: bool = False  # two TensorCores that jax drives as one device


# Public per-chip figures from Google Cloud's TPU pages; topology names are libtpu's ("v5e:4x4", "v4:2x2x2"). The
# clocks are the ones those peaks imply: v4 and v5p 2 cores, v5e and v6e 1; MXUs of 128x128, v6e's of 256x256.
# ICI: the pages' bidirectional bandwidth per chip (v5e 400 GB/s, v6e 800 GB/s over 4 ports in a 2D torus; v5p
# 1,200 GB/s over 6 in a 3D torus) split over its ports and two directions; v4's page gives only the all-reduce
# bandwidth per pod, 1.1 PB/s over 4,096 chips, which is half the bidirectional figure on v5e and v6e: 537 GB/s.
CHIPS = {
    "v4": Chip(275e12, 32 * GiB, 1228e9, 1.05e9, communication.Interconnect(1.1e15 / 4096 / 6, 6), megacore=True),
    "v5e": Chip(197e12, 16 * GiB, 819e9, 1.5e9, communication.Interconnect(400e9 / 8, 4)),
    "v5p": Chip(459e12, 95 * GiB, 2765e9, 1.75e9, communication.Interconnect(1200e9 / 12, 6), megacore=True),
    "v6e": Chip(918e12, 32 * GiB, 1640e9, 1.75e9, communication.Interconnect(800e9 / 8, 4)),
}


class DoesNotFit(ValueError):
    """The compiled step needs more memory per chip than the chip has."""


@dataclasses.dataclass(frozen=True)
class Report:
    topology: str
    trainer: str
    chips: int
    mesh: dict  # axis name -> size
    global_batch: int
    argument_bytes: int  # per chip: state and batch shards
    output_bytes: int  # per chip: outputs not written in place of donated arguments
    temp_bytes: int  # per chip: activations and other temporaries
    code_bytes: int  # per chip: the program itself
    hbm_bytes: int
    compiler_flops_per_chip: float  # XLA's cost analysis of one chip's program
    bytes_accessed_per_chip: float  # XLA's memory traffic of one chip's program
    loops: int  # while loops in the program (scanned layers, windowed matmuls): XLA counts each body once
    model_flops_per_step: float  # the model's own FLOPs for one global batch (no rematerialisation)
    compiler_cycles: int  # the TPU compiler's cycle estimates over one step, loops times their trips (0: none)
    loop_trips: tuple  # iteration counts of the program's loops, as the cycle count used them
    compute_s: float  # one step's compute, communication not included
    # "compiler cycles": compiler_cycles at the chip's clock; "compiler": XLA's cost-analysis time; "roofline": FLOPs
    # and bytes against the chip's peaks
    compute_source: str
    # One step's collectives per chip (`communication`): bytes each chip sends, and their time at the chip's ICI
    # bandwidth; None where a loop's iteration count cannot be read.
    communication_bytes: float | None
    communication_s: float | None
    collectives: dict  # kind -> {"executions", "bytes", "seconds"} per step
    uncosted: dict  # opcode -> executions per step of instructions with no cycle figure (compiler cycles only)
    lower_s: float
    compile_s: float

    @property
    def per_chip_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.per_chip_bytes <= self.hbm_bytes

    @property
    def step_s_full_overlap(self) -> float:
        """The step if communication hides entirely behind compute (or compute behind it)."""
        return max(self.compute_s, self.communication_s or 0.0)

    @property
    def step_s_no_overlap(self) -> float:
        """The step if nothing overlaps."""
        return self.compute_s + (self.communication_s or 0.0)

    def mfu(self, step_s: float) -> float:
        return self.model_flops_per_step / (self.chips * CHIPS[chip_name(self.topology)].peak_flops * step_s)

    def text(self) -> str:
        gib = lambda b: f"{b / GiB:.2f} GiB"
        chip = CHIPS[chip_name(self.topology)]
        fast, slow = self.step_s_full_overlap, self.step_s_no_overlap
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        return "\n".join([
            f"{self.trainer} train step on {self.topology}: {self.chips} chips, mesh {mesh}, global batch "
            f"{self.global_batch} (lowered in {self.lower_s:.1f} s, compiled in {self.compile_s:.1f} s)",
            f"  per-chip memory: arguments {gib(self.argument_bytes)} + outputs {gib(self.output_bytes)} + "
            f"temporaries {gib(self.temp_bytes)} + code {gib(self.code_bytes)} = {gib(self.per_chip_bytes)} "
            f"of {gib(self.hbm_bytes)} HBM ({100 * self.per_chip_bytes / self.hbm_bytes:.0f}%)"
            + ("" if self.fits else "  DOES NOT FIT"),
            f"  per chip (XLA's cost analysis, each of the program's {self.loops} loop bodies counted once): FLOPs "
            f"{self.compiler_flops_per_chip:.4g}, bytes accessed {self.bytes_accessed_per_chip:.4g}; model FLOPs per "
            f"step {self.model_flops_per_step:.4g}",
            f"  compute {self.compute_s * 1e3:.1f} ms ({self.compute_source}"
            + (f": {self.compiler_cycles:.4g} cycles at {chip.clock_hz / 1e9:g} GHz, "
               f"loops run {list(self.loop_trips)} times" if self.compute_source == "compiler cycles" else "")
            + ")" + (" (roofline: a lower bound)" if self.compute_source == "roofline" else ""),
            "  communication " + (
                "unknown (a loop's iteration count cannot be read)" if self.communication_s is None else
                f"{self.communication_s * 1e3:.1f} ms: {self.communication_bytes / 1e9:.2f} GB sent per chip ("
                + ", ".join(f"{kind} {c['executions']}x {c['bytes'] / 1e9:.2f} GB {c['seconds'] * 1e3:.1f} ms"
                            for kind, c in self.collectives.items())
                + f") over links of {chip.interconnect.link_bytes_per_s / 1e9:.1f} GB/s each way"),
            f"  estimated step {fast * 1e3:.1f}-{slow * 1e3:.1f} ms (full overlap - none), "
            f"MFU {100 * self.mfu(slow):.1f}-{100 * self.mfu(fast):.1f}%",
        ] + ([f"  without a cycle figure, not in the compute time: {sum(self.uncosted.values())} executions per step ("
              + ", ".join(f"{op} {n}" for op, n in list(self.uncosted.items())[:6]) + ", ...)"]
             if self.uncosted else []))

    def as_dict(self) -> dict:
        fast, slow = self.step_s_full_overlap, self.step_s_no_overlap
        return dict(dataclasses.asdict(self), per_chip_bytes=self.per_chip_bytes, fits=self.fits,
                    step_s_full_overlap=fast, step_s_no_overlap=slow, mfu_full_overlap=self.mfu(fast),
                    mfu_no_overlap=self.mfu(slow))

    def json_line(self) -> str:
        return json.dumps(self.as_dict())


def chip_name(topology: str) -> str:
    name = topology.split(":")[0].lower()
    if name not in CHIPS:
        raise ValueError(f"--aot_topology={topology!r}: unknown chip {name!r}; use one of {sorted(CHIPS)} with "
                         "libtpu's shape, e.g. v5e:4x4 or v4:2x2x2.")
    return name


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU topology, from libtpu."""
    from jax.experimental import topologies
    # Compiling touches no chip, so several compiling processes may share libtpu (it otherwise takes a lock).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        options = dict(chip_config_name="megacore") if CHIPS[chip_name(topology)].megacore else {}
        return list(topologies.get_topology_desc(topology, "tpu", **options).devices)
    except Exception as e:
        raise RuntimeError(
            f"libtpu could not describe topology {topology!r} ({type(e).__name__}: {e}). Compiling for TPUs needs "
            "libtpu of the installed jax version: `make tpu-venv`, then run with `.venv-tpu/bin/python`; check the "
            "topology name (e.g. v5e:16x16, v4:4x4x4).") from e


def _trainer(config: ml_collections.ConfigDict):
    """(step module, trainer module) of `config.trainer`."""
    if config.trainer == "seq2seq":
        from dalle_jax.trainers import seq2seq_trainer as seq2seq, seq2seq_step
        return seq2seq_step, seq2seq
    if config.trainer == "vqgan":
        from dalle_jax.trainers import vqgan_trainer as vqgan, vqgan_step
        return vqgan_step, vqgan
    raise ValueError(f"config.trainer={config.trainer!r} is not a trainer; use 'vqgan' or 'seq2seq'.")


def abstract_state(step_module, config, mesh):
    """The trainer's setup and its state as sharded ShapeDtypeStructs, traced (never run or allocated)."""
    built = {}

    def create():
        setup, state, shardings = step_module.create(config, mesh)
        built.update(setup=setup, shardings=shardings)
        return state

    shapes = jax.eval_shape(create)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, built["shardings"])
    return built["setup"], built["shardings"], state


def lower_train_step(config: ml_collections.ConfigDict, mesh) -> jax.stages.Lowered:
    """The trainer's train step for `mesh`, lowered with abstract sharded inputs: no data, no work directory."""
    step_module, trainer = _trainer(config)
    parallel.check_global_batch(config.data.batch_size, mesh)
    setup, shardings, state = abstract_state(step_module, config, mesh)
    batch_sh = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
             for k, v in trainer.batch_shapes(config).items()}
    return trainer.jit_train_step(setup, shardings, mesh).lower(state, batch)


def model_flops_per_step(config: ml_collections.ConfigDict, compiler_flops_per_chip: float, chips: int) -> float:
    """The model's FLOPs for one global batch: DalleBart's matmul count; for the VQGAN, which never
    rematerialises, XLA's count over all chips (work replicated across chips is counted on each)."""
    if config.trainer == "seq2seq":
        from dalle_jax.models import dalle_bart
        return dalle_bart.train_flops_per_example(config.model) * config.data.batch_size
    return compiler_flops_per_chip * chips


def _cost(analysis) -> dict:
    return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def compile_for_topology(config: ml_collections.ConfigDict, topology: str, *, hlo_path: str | None = None) -> Report:
    """Compiles the train step for `topology` and reports on it; `hlo_path`, if given, receives the optimised HLO."""
    chip_name(topology)
    devices = topology_devices(topology)
    mesh = parallel.make_mesh(config.mesh, devices)
    start = time.perf_counter()
    lowered = lower_train_step(config, mesh)
    lowered_at = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA refuses, as RESOURCE_EXHAUSTED, a program whose buffers exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        raise DoesNotFit(f"The {config.trainer} train step does not fit on {topology} at a global batch of "
                         f"{config.data.batch_size}; XLA says: {str(e).strip().splitlines()[-1]} {_FIXES}") from e
    compiled_at = time.perf_counter()
    hlo_text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo_text)
    # The HLO's device ids index the mesh's devices in order; their torus coordinates say which axes a group spans.
    coords = [tuple(d.coords) for d in mesh.devices.flat]
    return summarise(config, topology, dict(mesh.shape), compiled.memory_analysis(),
                     _cost(compiled.cost_analysis()), hlo_text, lower_s=lowered_at - start,
                     compile_s=compiled_at - lowered_at, coords=coords)


def summarise(config, topology: str, mesh_shape: dict, memory, cost: dict, hlo_text: str, *, lower_s: float,
              compile_s: float, coords=None) -> Report:
    """The report of one compiled step from XLA's memory and cost analyses and its optimised HLO (`coords`: the
    torus coordinates of the devices its groups name, in order).

    Communication is the program's collectives at the chip's interconnect bandwidth (`communication`). The compute
    time is, in order of preference: the TPU compiler's own per-instruction cycle estimates summed over
    one step (`tpu_cycles`: each loop body times its iteration count) at the chip's clock; XLA's cost-analysis time
    when positive; the roofline max(FLOPs / peak, bytes / HBM bandwidth). XLA's cost analysis counts the body of a
    loop once (`loops` says how many the program has; scanned layers are one), so its FLOPs fall short of the
    model's: the roofline takes the larger of the two and is then a lower bound on the step time, and the MFU an
    upper bound.
    """
    chip = CHIPS[chip_name(topology)]
    chips = math.prod(mesh_shape.values())
    flops = float(cost.get("flops", 0.0))
    accessed = float(cost.get("bytes accessed", 0.0))
    compiler_s = float(cost.get("optimal_seconds", 0.0))
    model_flops = model_flops_per_step(config, flops, chips)
    cycles = tpu_cycles.program_cycles(hlo_text)
    program = tpu_cycles.program_lines(hlo_text)
    collectives = communication.program_collectives(hlo_text, coords)
    traffic = None if collectives is None else communication.traffic(collectives, chip.interconnect)
    if cycles is not None:
        step_s, source = cycles.cycles / chip.clock_hz, "compiler cycles"
    elif compiler_s > 0:
        step_s, source = compiler_s, "compiler"
    else:
        compute = max(flops, model_flops / chips)
        step_s, source = max(compute / chip.peak_flops, accessed / chip.hbm_bytes_per_s), "roofline"
    return Report(
        topology=topology, trainer=config.trainer, chips=chips, mesh=mesh_shape,
        global_batch=int(config.data.batch_size),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes - memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes), code_bytes=int(memory.generated_code_size_in_bytes),
        hbm_bytes=chip.hbm_bytes, compiler_flops_per_chip=flops, bytes_accessed_per_chip=accessed,
        loops=hlo_text.count(" while("), model_flops_per_step=model_flops,
        compiler_cycles=cycles.cycles if cycles else 0, loop_trips=cycles.trip_counts if cycles else (),
        compute_s=step_s, compute_source=source,
        communication_bytes=traffic and traffic.total_bytes, communication_s=traffic and traffic.total_seconds,
        collectives={} if traffic is None else {
            kind: dict(executions=traffic.executions[kind], bytes=traffic.sent_bytes[kind],
                       seconds=traffic.seconds[kind]) for kind in traffic.executions},
        uncosted=tpu_cycles.uncosted(program) if cycles is not None else {},
        lower_s=lower_s, compile_s=compile_s)


def check_fits(report: Report) -> None:
    """Raises DoesNotFit, naming the figures and the usual fixes, when the step exceeds a chip's HBM."""
    if report.fits:
        return
    raise DoesNotFit(
        f"The {report.trainer} train step needs {report.per_chip_bytes / GiB:.2f} GiB per chip on {report.topology} "
        f"but a chip has {report.hbm_bytes / GiB:.0f} GiB of HBM (arguments {report.argument_bytes / GiB:.2f}, "
        f"temporaries {report.temp_bytes / GiB:.2f} GiB). {_FIXES}")


_FIXES = ("Lower config.data.batch_size (or raise config.optimizer.accumulation_steps), set "
          "config.model.remat='full', shard more over config.mesh.fsdp, or use config.optimizer.name='adafactor'.")

