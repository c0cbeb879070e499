"""What one run of a compiled program sends between chips, read from its optimised HLO, and how long that takes.

Every collective the program runs (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute), each
loop's by its iteration count (`tpu_cycles.program_lines`), whether it stands alone, as a `-start`/`-done` pair or
inside the fusions libtpu makes of asynchronous collectives (counted once, at the start). Per chip and execution,
for a group of n chips and B bytes of data (the gathered result, the scattered operand, the reduced or exchanged
arrays), the bytes each chip sends, and receives, as ring algorithms move them:

- all-gather, reduce-scatter, all-to-all: (n - 1) / n x B
- all-reduce: 2 (n - 1) / n x B (a reduce-scatter, then an all-gather)
- collective-permute: B, when the chip sends to another

The time is those bytes through the links the group can use (`Interconnect.seconds`). It is a bandwidth bound:
latency per hop, contention between collectives that run at once, and traffic between slices over the data-centre
network are not in it, and whether communication overlaps compute is left to the caller.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator, Sequence

from dalle_jax.pods import tpu_cycles

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+\w*)\[([\d,]*)\]")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_PARTITIONS = re.compile(r"num_partitions=(\d+)")
_ASYNC_START = re.compile(r"custom_call_target=\"AsyncCollectiveStart\"")
_CHAIN = re.compile(r"chain_id=\"\d+\"")


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """A chip's inter-chip links: `ports` links, each `link_bytes_per_s` in each direction at once."""
    link_bytes_per_s: float
    ports: int

    def seconds(self, collective: "Collective") -> float:
        """One execution at the bandwidth of the links it can use: a bidirectional ring along each torus axis the
        group spans, two links per axis (at most the chip's ports); a collective-permute over one link."""
        links = 1 if collective.kind == "collective-permute" else min(2 * collective.axes, self.ports)
        return collective.sent_bytes / (links * self.link_bytes_per_s)


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str  # the instruction
    kind: str  # one of KINDS
    data_bytes: int  # B above, per chip
    group_size: int  # n; for a collective-permute 2 when data leaves the chip, else 1
    axes: int  # torus axes its groups span (1 where the chips' coordinates are not given)
    runs: int  # executions in one run of the program

    @property
    def sent_bytes(self) -> float:
        """Bytes each chip sends (and receives) in one execution."""
        n = self.group_size
        if n <= 1:
            return 0.0
        if self.kind == "collective-permute":
            return float(self.data_bytes)
        return (2 if self.kind == "all-reduce" else 1) * (n - 1) / n * self.data_bytes


def array_bytes(type_text: str) -> list[int]:
    """Bytes of every array in an HLO type, e.g. `(bf16[4,8]{1,0}, f32[2])` -> [64, 8]."""
    sizes = []
    for dtype, dims in _ARRAY.findall(type_text):
        bits = 8 if dtype == "pred" else int(re.search(r"\d+", dtype).group()) * (2 if dtype[0] == "c" else 1)
        sizes.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
    return sizes


def _iota(dims: list[int], perm: list[int]) -> list[int]:
    """iota(prod(dims)) reshaped to `dims`, transposed by `perm`, flattened."""
    strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
    shape = [dims[p] for p in perm]
    ids = []
    for flat in range(math.prod(dims)):
        index, rest = [], flat
        for size in reversed(shape):
            index.append(rest % size)
            rest //= size
        ids.append(sum(i * strides[p] for i, p in zip(reversed(index), perm)))
    return ids


def replica_groups(line: str, devices: int) -> list[list[int]]:
    """The device groups of a collective: explicit `{{0,1},{2,3}}`, iota `[G,n]<=[dims]T(perm)`, mesh axes
    `mesh['a'=2,'b'=4] {'b'}` (devices numbered in the mesh's order), or, with none, all devices."""
    if (iota := _IOTA_GROUPS.search(line)) is not None:
        shape = [int(d) for d in iota.group(1).split(",")]
        dims = [int(d) for d in iota.group(2).split(",")]
        perm = [int(d) for d in iota.group(3).split(",")] if iota.group(3) else list(range(len(dims)))
        ids, n = _iota(dims, perm), math.prod(shape[1:])
        return [ids[g * n:(g + 1) * n] for g in range(len(ids) // n)]
    if (mesh := _MESH_GROUPS.search(line)) is not None:
        axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        grouped = set(re.findall(r"'([^']+)'", mesh.group(2)))
        dims = [int(size) for _, size in axes]
        # The grouped axes last: each group is then a run of consecutive ids in the transposed order.
        perm = [i for i, (a, _) in enumerate(axes) if a not in grouped] + \
               [i for i, (a, _) in enumerate(axes) if a in grouped]
        ids = _iota(dims, perm)
        n = math.prod(dims[i] for i, (a, _) in enumerate(axes) if a in grouped)
        return [ids[g * n:(g + 1) * n] for g in range(len(ids) // n)]
    explicit = _EXPLICIT_GROUPS.search(line)
    groups = [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))] \
        if explicit else []
    return [g for g in groups if g] or [list(range(devices))]


def _axes_spanned(groups: list[list[int]], coords: Sequence[Sequence[int]] | None) -> int:
    if coords is None:
        return 1
    dims = range(len(coords[0]))
    return max(max(sum(len({coords[d][a] for d in group}) > 1 for a in dims), 1) for group in groups)


def _collective_lines(line: str, bodies: dict[str, list[str]], inside_start: bool = False) -> Iterator[str]:
    """The collective instructions a top-level instruction runs: itself, or those in the computations it calls
    (fusions, async wrappers). An asynchronous collective counts once: at its `-start`, not its `-done`; and where
    libtpu splits one over several fusions (a start, continuations fused with compute, a done, all with its
    `chain_id`), in the fusion that starts it."""
    parts = tpu_cycles.instruction_parts(line)
    if parts is None or parts[2].endswith("-done"):
        return
    if parts[2].removesuffix("-start") in KINDS:
        if inside_start or not _CHAIN.search(line):
            yield line
        return
    if parts[2] in ("while", "call", "conditional") or (called := _CALLS.search(line)) is None:
        return
    body = bodies.get(called.group(1), [])
    starts = any(_ASYNC_START.search(inner) for inner in body)
    for inner in body:
        yield from _collective_lines(inner, bodies, starts)


def _data_bytes(kind: str, opcode: str, result: str, n: int) -> int:
    if opcode.endswith("-start") and kind != "all-reduce":
        # (operands, results, scalar context): of the arrays that have dimensions, the first half are the operands.
        arrays = [size for size, (_, dims) in zip(array_bytes(result), _ARRAY.findall(result)) if dims]
        half = len(arrays) // 2
        return sum(arrays[:half]) if kind == "reduce-scatter" else sum(arrays[half:])
    return sum(array_bytes(result)) * (n if kind == "reduce-scatter" else 1)


def program_collectives(hlo_text: str, coords: Sequence[Sequence[int]] | None = None) -> list[Collective] | None:
    """The collectives one run of a compiled program executes; None when a loop's iteration count cannot be read.
    `coords[d]`: the torus position of device d (the ids of the HLO's groups), for the axes a group spans."""
    program = tpu_cycles.program_lines(hlo_text)
    if program is None:
        return None
    _, bodies = tpu_cycles.computations(hlo_text)
    partitions = _PARTITIONS.search(hlo_text)
    devices = int(partitions.group(1)) if partitions else 1
    found = []
    for top, runs in program.lines:
        for line in _collective_lines(top, bodies):
            name, result, opcode = tpu_cycles.instruction_parts(line)
            kind = opcode.removesuffix("-start")
            if kind == "collective-permute":
                pairs = _PAIRS.search(line)
                moves = pairs and any(s != t for s, t in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1)))
                n, axes = (2 if moves else 1), 1
            else:
                groups = replica_groups(line, devices)
                n, axes = len(groups[0]), _axes_spanned(groups, coords)
            found.append(Collective(name, kind, _data_bytes(kind, opcode, result, n), n, axes, runs))
    return found


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One run of a program's collectives, per chip, summed by kind."""
    executions: dict  # kind -> executions
    sent_bytes: dict  # kind -> bytes each chip sends
    seconds: dict  # kind -> time at the interconnect's bandwidth

    @property
    def total_bytes(self) -> float:
        return sum(self.sent_bytes.values())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def traffic(collectives: list[Collective], interconnect: Interconnect) -> Traffic:
    executions, sent, seconds = {}, {}, {}
    for c in collectives:
        executions[c.kind] = executions.get(c.kind, 0) + c.runs
        sent[c.kind] = sent.get(c.kind, 0.0) + c.runs * c.sent_bytes
        seconds[c.kind] = seconds.get(c.kind, 0.0) + c.runs * interconnect.seconds(c)
    return Traffic(executions, sent, seconds)
