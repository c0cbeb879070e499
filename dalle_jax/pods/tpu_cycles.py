"""The TPU compiler's own compute-time estimate, read from a compiled program's optimised HLO.

libtpu gives the scheduled top-level instructions that compute (fusions, copies, broadcasts) an `"estimated_cycles"`
entry in their backend config: its cost model's cycle count for that instruction on one TensorCore. One run of the
program costs the sum over the entry computation, where a `while` adds its body and condition once per iteration
and a `call` or `conditional` adds what it calls (the costlier branch). Fused computations are not entered: the
fusion instruction carries their cost. Nothing in the sum overlaps. Collectives carry no figure (`communication`
models them); other instructions without one are counted by `uncosted`, not taken as free.

A loop's iteration count is the one XLA states (`known_trip_count`, which XLA:CPU writes and libtpu does not), else
N - start for a condition `counter < N`, where N is a constant and start is the counter's constant initial value in
the tuple the loop is given (through copies): what `lax.scan`, `fori_loop` and XLA's own windowed-matmul loops
compile to. A loop written any other way has no count here, and neither has the
program: `program_cycles` returns None rather than a figure that counts it once.
"""
from __future__ import annotations

import dataclasses
import re

_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_WHILE = re.compile(r" while\(%([\w.\-]+)\), condition=%([\w.\-]+), body=%([\w.\-]+)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALL = re.compile(r" call\(.*to_apply=%([\w.\-]+)")
_BRANCHES = re.compile(r" conditional\(.*branch_computations=\{([^}]*)\}")
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_CONSTANT = re.compile(r"%([\w.\-]+) = [su](?:32|64)\[\]\S* constant\((-?\d+)\)")
_COPY = re.compile(r" = [su](?:32|64)\[\]\S* copy\(%([\w.\-]+)\)")
_TUPLE = re.compile(r" tuple\((.*?)\)(?:, [a-z_]+=|$)")
_COUNTER_LT = re.compile(r"ROOT %[\w.\-]+ = pred\[\]\S* compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT")
_COUNTER = re.compile(r"%([\w.\-]+) = [su](?:32|64)\[\]\S* get-tuple-element\(%[\w.\-]+\), index=(\d+)")


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


def instruction_parts(line: str) -> tuple[str, str, str] | None:
    """(name, result type, opcode) of an instruction line, else None."""
    head = _DEFINITION.match(line)
    if head is None:
        return None
    text, depth = line[head.end():], 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == " " and depth == 0:
            return head.group(1), text[:i], text[i + 1:].partition("(")[0]
    return None


def loop_limit(condition: list[str]) -> tuple[int, int] | None:
    """(index of the counter in the loop's tuple, N) for a condition `ROOT compare(get-tuple-element(param, index),
    constant(N)), direction=LT`, else None."""
    constants = {m.group(1): int(m.group(2)) for m in map(_CONSTANT.search, condition) if m}
    counters = {m.group(1): int(m.group(2)) for m in map(_COUNTER.search, condition) if m}
    for line in condition:
        compare = _COUNTER_LT.search(line)
        if compare and compare.group(1) in counters and compare.group(2) in constants:
            return counters[compare.group(1)], constants[compare.group(2)]
    return None


def _constant_value(name: str, definitions: dict[str, str]) -> int | None:
    """The value of a scalar integer constant named directly or through copies, within one computation."""
    for _ in range(len(definitions) + 1):
        line = definitions.get(name, "")
        if (constant := _CONSTANT.search(line)) is not None:
            return int(constant.group(2))
        if (copy := _COPY.search(line)) is None:
            return None
        name = copy.group(1)
    return None


def trip_count(operand: str, condition: list[str], definitions: dict[str, str]) -> int | None:
    """Iterations of a loop given the tuple `operand` (defined in `definitions`, its caller's instructions)."""
    limit = loop_limit(condition)
    tuple_args = _TUPLE.search(definitions.get(operand, ""))
    if limit is None or tuple_args is None:
        return None
    index, n = limit
    args = [a.split("*/")[-1].strip().lstrip("%") for a in tuple_args.group(1).split(",")]
    start = _constant_value(args[index], definitions) if index < len(args) else None
    return None if start is None else max(n - start, 0)


@dataclasses.dataclass(frozen=True)
class ProgramLines:
    lines: tuple[tuple[str, int], ...]  # (instruction line, runs per run of the program), in program order
    trip_counts: tuple[int, ...]  # as in ProgramCycles


def cycles_of(line: str) -> int | None:
    """The instruction's own estimated cycles, or None when libtpu gave it no figure."""
    cycles = _CYCLES.search(line)
    return None if cycles is None else int(cycles.group(1))


def program_lines(hlo_text: str) -> ProgramLines | None:
    """Every instruction that one run of the program executes, with how many times it runs: a loop's body and
    condition by its iteration count (the condition once more), a call's callee once, a conditional's costlier
    branch (by estimated cycles). None when a loop's iteration count cannot be read."""
    entry, bodies = computations(hlo_text)
    trips: list[int] = []

    def walk(name: str, times: int) -> list[tuple[str, int]] | None:
        out: list[tuple[str, int]] = []
        definitions = {m.group(1): line for line in bodies[name] if (m := _DEFINITION.match(line))}
        for line in bodies[name]:
            out.append((line, times))
            inner: list | None = []
            if (loop := _WHILE.search(line)) is not None:
                operand, condition, body = loop.groups()
                known = _KNOWN_TRIPS.search(line)
                n = int(known.group(1)) if known else trip_count(operand, bodies[condition], definitions)
                if n is None:
                    return None
                trips.append(n)
                parts = [walk(body, times * n), walk(condition, times * (n + 1))]
                inner = None if None in parts else parts[0] + parts[1]
            elif (call := _CALL.search(line)) is not None:
                inner = walk(call.group(1), times)
            elif (branches := _BRANCHES.search(line)) is not None:
                options = [walk(b.strip().lstrip("%"), times) for b in branches.group(1).split(",")]
                inner = None if None in options else max(options, key=_total_cycles)
            if inner is None:
                return None
            out += inner
        return out

    lines = walk(entry, 1)
    return None if lines is None else ProgramLines(tuple(lines), tuple(trips))


def _total_cycles(lines: list[tuple[str, int]]) -> int:
    return sum((cycles_of(line) or 0) * times for line, times in lines)


def program_cycles(hlo_text: str) -> ProgramCycles | None:
    """The estimated cycles of one run of a compiled TPU program; None when it carries no estimates (it was not
    compiled for a TPU) or has a loop whose iteration count cannot be read."""
    program = program_lines(hlo_text)
    if program is None or not _CYCLES.search(hlo_text):
        return None
    return ProgramCycles(cycles=_total_cycles(list(program.lines)), trip_counts=program.trip_counts)


# Instructions that move no data of their own, and collectives (whose time `communication` models; libtpu's
# asynchronous ones are fusions calling AsyncCollectiveStart/Done): neither is expected to carry a cycle figure.
_STRUCTURAL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "partition-id", "replica-id", "after-all", "opt-barrier"}
_COLLECTIVE = re.compile(r"^(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start|-done)?$")
_ASYNC_COLLECTIVE = re.compile(r"\bcalls=%async[_-]collective|%async-collective-(?:start|done)")


def uncosted(program: ProgramLines) -> dict[str, int]:
    """Executions per step of the instructions that do work but carry no cycle figure (async copies and slices,
    scalar arithmetic, ...), by opcode: what the cycle sum leaves out besides communication."""
    counts: dict[str, int] = {}
    for line, times in program.lines:
        if cycles_of(line) is not None or (parts := instruction_parts(line)) is None:
            continue
        name = parts[2]
        if name in _STRUCTURAL or _COLLECTIVE.match(name) or _ASYNC_COLLECTIVE.search(line):
            continue
        counts[name] = counts.get(name, 0) + times
    return dict(sorted(counts.items(), key=lambda item: -item[1]))
