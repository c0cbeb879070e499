"""The TPU compiler's own step-time estimate, read from a compiled program's optimised HLO.

libtpu schedules every top-level instruction (a fusion, a collective, a copy) with an `"estimated_cycles"` entry in
its backend config: its cost model's cycle count for that instruction on one TensorCore. One run of the program
costs the sum over the entry computation, where a `while` adds its body and condition once per iteration and a
`call` or `conditional` adds what it calls (the costlier branch). Fused computations are not entered: the fusion
instruction carries their cost. Nothing overlaps in this sum, so asynchronous collectives that the schedule hides
behind compute are counted in full; the estimate errs on the slow side.

A loop's iteration count is read from its condition, `counter < N` with the counter starting at 0, which is what
`lax.scan` and `fori_loop(0, N)` compile to. A loop written any other way has no count here, and neither has the
program: `program_cycles` returns None rather than a figure that counts it once.
"""
from __future__ import annotations

import dataclasses
import re

_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_WHILE = re.compile(r" while\(.*condition=%([\w.\-]+), body=%([\w.\-]+)")
_CALL = re.compile(r" call\(.*to_apply=%([\w.\-]+)")
_BRANCHES = re.compile(r" conditional\(.*branch_computations=\{([^}]*)\}")
_CONSTANT = re.compile(r"%([\w.\-]+) = s(?:32|64)\[\]\S* constant\((-?\d+)\)")
_COUNTER_LT = re.compile(r"ROOT %[\w.\-]+ = pred\[\]\S* compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT")
_COUNTER = re.compile(r"%([\w.\-]+) = s(?:32|64)\[\]\S* get-tuple-element\(%[\w.\-]+\), index=(\d+)")


@dataclasses.dataclass(frozen=True)
class ProgramCycles:
    cycles: int  # one run of the program, loops unrolled by their iteration counts
    trip_counts: tuple[int, ...]  # iteration counts, one per loop of the program, an outer loop before its inner ones


def computations(hlo_text: str) -> tuple[str, dict[str, list[str]]]:
    """(name of the entry computation, {computation name: its instruction lines})."""
    bodies: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            bodies[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    if entry is None:
        raise ValueError("the HLO text has no ENTRY computation; pass a compiled program's `as_text()`.")
    return entry, bodies


def trip_count(condition: list[str]) -> int | None:
    """N for a loop condition `ROOT compare(get-tuple-element(param), constant(N)), direction=LT`, else None."""
    constants = {m.group(1): int(m.group(2)) for m in map(_CONSTANT.search, condition) if m}
    counters = {m.group(1) for m in map(_COUNTER.search, condition) if m}
    for line in condition:
        compare = _COUNTER_LT.search(line)
        if compare and compare.group(1) in counters and compare.group(2) in constants:
            return constants[compare.group(2)]
    return None


def program_cycles(hlo_text: str) -> ProgramCycles | None:
    """The estimated cycles of one run of a compiled TPU program; None when it carries no estimates (it was not
    compiled for a TPU) or has a loop whose iteration count cannot be read."""
    entry, bodies = computations(hlo_text)
    trips: list[int] = []

    def cost(name: str) -> int | None:
        total = 0
        for line in bodies[name]:
            if (cycles := _CYCLES.search(line)) is not None:
                total += int(cycles.group(1))
            if (loop := _WHILE.search(line)) is not None:
                condition, body = loop.groups()
                n = trip_count(bodies[condition])
                if n is None:
                    return None
                trips.append(n)
                inner = [cost(body), cost(condition)]
                if None in inner:
                    return None
                total += n * inner[0] + (n + 1) * inner[1]
            elif (call := _CALL.search(line)) is not None:
                inner = cost(call.group(1))
                if inner is None:
                    return None
                total += inner
            elif (branches := _BRANCHES.search(line)) is not None:
                inner = [cost(b.strip().lstrip("%")) for b in branches.group(1).split(",")]
                if None in inner:
                    return None
                total += max(inner)
        return total

    total = cost(entry)
    if total is None or not _CYCLES.search(hlo_text):
        return None
    return ProgramCycles(cycles=total, trip_counts=tuple(trips))
