"""The TPU compiler's cycle estimates summed over one run of a program, on HLO text written the way libtpu prints
it (a compiled program's `as_text()`): loops by their iteration counts, fusions by their own figure."""
import jax
import jax.numpy as jnp
import pytest

from dalle_jax.pods import tpu_cycles
from tests.pods.test_aot import _report

FUSED = """
%fused_computation.7 (param_0.1: f32[8]) -> f32[8] {
  %param_0.1 = f32[8]{0:T(256)} parameter(0)
  ROOT %negate.3 = f32[8]{0:T(256)} negate(%param_0.1), backend_config={"estimated_cycles":"100000"}
}
"""


def _loop(name: str, limit: str, body_cycles: int, inner: str = "", compare: str = "compare(%i.{n}, %limit.{n})") -> str:
    """A scan-shaped loop: condition `counter < limit`, a body with one fusion (and optionally a nested loop)."""
    return f"""
%body.{name} (p.{name}: (s32[], f32[8])) -> (s32[], f32[8]) {{
  %p.{name} = (s32[]{{:T(128)}}, f32[8]{{0:T(256)}}) parameter(0)
  %x.{name} = f32[8]{{0:T(256)}} get-tuple-element(%p.{name}), index=1
  %fusion.{name} = f32[8]{{0:T(256)}} fusion(%x.{name}), kind=kLoop, calls=%fused_computation.7, metadata={{op_name="jit(step)/while/body/neg"}}, backend_config={{"flag_configs":[],"estimated_cycles":"{body_cycles}","ml_estimated_microseconds":0}}
{inner}  ROOT %t.{name} = (s32[]{{:T(128)}}, f32[8]{{0:T(256)}}) tuple(%p.{name}, %fusion.{name})
}}

%cond.{name} (c.{name}: (s32[], f32[8])) -> pred[] {{
  %limit.{name} = s32[]{{:T(128)}} constant({limit})
  %c.{name} = (s32[]{{:T(128)}}, f32[8]{{0:T(256)}}) parameter(0)
  %i.{name} = s32[]{{:T(128)}} get-tuple-element(%c.{name}), index=0
  ROOT %lt.{name} = pred[]{{:T(512)}} {compare.format(n=name)}, direction=LT, backend_config={{"estimated_cycles":"1"}}
}}
"""


def _while(name: str, start: str, data: str) -> str:
    """The loop's tuple, its counter starting at `start` (an instruction name), then the loop."""
    return (f"  %t0.{name} = (s32[]{{:T(128)}}, f32[8]{{0:T(256)}}) tuple(%{start}, %{data})\n"
            f"  %while.{name} = (s32[]{{:T(128)}}, f32[8]{{0:T(256)}}) while(%t0.{name}), condition=%cond.{name}, "
            f"body=%body.{name}, metadata={{op_name=\"jit(step)/while\"}}\n")


def _program(*, limit="6", compare="compare(%i.{n}, %limit.{n})", outer_start="zero.1", inner_start="1") -> str:
    """ENTRY (40 cycles of its own) runs loop `outer` `limit` times (from `outer_start`); each outer body (100 cycles)
    runs loop `inner` 4 - `inner_start` times (20 cycles a body), its counter's start reached through a copy; a
    conditional takes the costlier of its two called computations (7 or 9 cycles)."""
    inner_setup = (f"  %start.inner = s32[]{{:T(128)}} constant({inner_start}), metadata={{op_name=\"x\"}}\n"
                   "  %copy.inner = s32[]{:T(128)} copy(%start.inner), backend_config={\"estimated_cycles\":\"0\"}\n")
    inner_loop = _loop("inner", "4", 20)
    outer_loop = _loop("outer", limit, 100, inner=inner_setup + _while("inner", "copy.inner", "x.outer"),
                       compare=compare)
    branches = """
%branch.a (a.1: f32[8]) -> f32[8] {
  %a.1 = f32[8]{0:T(256)} parameter(0)
  ROOT %copy.1 = f32[8]{0:T(256)} copy(%a.1), backend_config={"estimated_cycles":"7"}
}

%branch.b (b.1: f32[8]) -> f32[8] {
  %b.1 = f32[8]{0:T(256)} parameter(0)
  ROOT %copy.2 = f32[8]{0:T(256)} copy(%b.1), backend_config={"estimated_cycles":"9"}
}
"""
    entry = f"""
ENTRY %main.12_spmd (x.1: f32[8], k.1: s32[]) -> f32[8] {{
  %x.1 = f32[8]{{0:T(256)}} parameter(0)
  %k.1 = s32[]{{:T(128)}} parameter(1)
  %fusion.9 = f32[8]{{0:T(256)}} fusion(%x.1), kind=kLoop, calls=%fused_computation.7, backend_config={{"estimated_cycles":"40"}}
  %zero.1 = s32[]{{:T(128)}} constant(0)
{_while("outer", outer_start, "fusion.9")}  %conditional.1 = f32[8]{{0:T(256)}} conditional(%k.1, %x.1, %x.1), branch_computations={{%branch.a, %branch.b}}
  ROOT %r = f32[8]{{0:T(256)}} copy(%conditional.1)
}}
"""
    return "HloModule jit_step, is_scheduled=true\n" + FUSED + inner_loop + outer_loop + branches + entry


def test_loops_count_once_per_iteration_and_fusions_by_their_own_figure():
    result = tpu_cycles.program_cycles(_program())
    # inner loop: 3 bodies of 20 + 4 condition checks of 1 = 64; outer: 6 x (100 + 64) + 7 checks = 991.
    assert result.cycles == 40 + 6 * (100 + 3 * 20 + 4 * 1) + 7 * 1 + 9
    assert result.trip_counts == (6, 3)


def test_a_counter_that_starts_above_zero_runs_fewer_times():
    assert tpu_cycles.program_cycles(_program(inner_start="2")).cycles == 40 + 6 * (100 + 2 * 20 + 3 * 1) + 7 + 9


def test_a_loop_whose_count_cannot_be_read_gives_no_estimate():
    assert tpu_cycles.program_cycles(_program(compare="compare(%limit.{n}, %i.{n})")) is None  # not counter < N
    assert tpu_cycles.program_cycles(_program(limit="%k.1")) is None  # no constant limit
    assert tpu_cycles.program_cycles(_program(outer_start="k.1")) is None  # the start is a parameter


def test_a_program_compiled_for_another_backend_has_no_estimate():
    hlo = jax.jit(lambda x: jnp.tanh(x) @ x).lower(jnp.ones((4, 4))).compile().as_text()
    assert tpu_cycles.program_cycles(hlo) is None
    with pytest.raises(ValueError, match="no ENTRY computation"):
        tpu_cycles.program_cycles("%f (a: f32[]) -> f32[] {\n}\n")


def test_the_report_prefers_the_compiler_cycles_at_the_chip_clock():
    report = _report(1 << 30, _program(), optimal_seconds=0.25)
    assert report.compute_source == "compiler cycles"
    assert report.compiler_cycles == 40 + 6 * 164 + 7 + 9 and report.loop_trips == (6, 3)
    assert report.compute_s == pytest.approx(report.compiler_cycles / 1.5e9)  # v5e's clock
    assert "cycles at 1.5 GHz, loops run [6, 3] times" in report.text()
    assert report.mfu(report.compute_s) == pytest.approx(report.model_flops_per_step / (4 * 197e12 * report.compute_s))
    # What does work without a figure is counted: the entry's last copy (constants, tuples and the like move nothing).
    assert report.uncosted == {"copy": 1}
    assert "without a cycle figure, not in the compute time: 1 executions per step (copy 1" in report.text()


def test_instructions_without_a_figure_are_counted_each_time_they_run():
    hlo = _program().replace('copy(%start.inner), backend_config={"estimated_cycles":"0"}', "copy(%start.inner)")
    program = tpu_cycles.program_lines(hlo)
    assert tpu_cycles.uncosted(program) == {"copy": 1 + 6}  # the entry's, and the outer loop's in each iteration
    assert tpu_cycles.program_cycles(hlo).cycles == tpu_cycles.program_cycles(_program()).cycles
