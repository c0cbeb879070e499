"""Ahead-of-time compilation for TPU topologies: the report, the does-not-fit error, and `train.py --aot_topology`
compiling the tiny seq2seq step for a v5e:2x2 slice with libtpu (from `make tpu-venv`)."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from dalle_jax.configs import shapes_dalle
from dalle_jax.pods import aot
from tests.conftest import REPO, subprocess_env

TPU_PYTHON = os.path.join(REPO, ".venv-tpu", "bin", "python")
needs_libtpu = pytest.mark.skipif(not os.path.exists(TPU_PYTHON),
                                  reason="needs libtpu in .venv-tpu: run `make tpu-venv`")


def _scanned_matmuls_hlo(layers: int, m=16, k=32) -> str:
    def loss(w, x):
        h, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
        return h.sum()
    return jax.jit(jax.grad(loss)).lower(jnp.ones((layers, k, k)), jnp.ones((m, k))).compile().as_text()


def _report(temp_bytes: int, hlo: str, optimal_seconds: float = -1.0) -> aot.Report:
    memory = types.SimpleNamespace(argument_size_in_bytes=1 << 20, output_size_in_bytes=1 << 20,
                                   alias_size_in_bytes=1 << 20, temp_size_in_bytes=temp_bytes,
                                   generated_code_size_in_bytes=1 << 10)
    cost = {"flops": 1e6, "bytes accessed": 1e6, "optimal_seconds": optimal_seconds}
    return aot.summarise(shapes_dalle.get_config("tiny"), "v5e:2x2", dict(data=4, fsdp=1, tensor=1), memory, cost,
                         hlo, lower_s=0.0, compile_s=0.0)


def test_report_adds_memory_and_falls_back_to_the_roofline():
    hlo = _scanned_matmuls_hlo(4)
    report = _report(3 << 30, hlo)
    assert report.per_chip_bytes == (1 << 20) + (3 << 30) + (1 << 10)  # outputs donated in place of arguments
    assert report.fits and report.hbm_bytes == 16 * aot.GiB
    # A negative compiler estimate is ignored for the roofline of XLA's counts; the scan's loops are reported.
    assert report.compute_source == "roofline" and report.loops == hlo.count(" while(") >= 1
    # XLA's 1e6 FLOPs fall short of the model's, which the roofline uses instead.
    model_per_chip = report.model_flops_per_step / 4
    assert model_per_chip > 1e6
    assert report.compute_s == pytest.approx(max(model_per_chip / 197e12, 1e6 / 819e9))
    # One device's program has no collectives: the range closes on the compute time.
    assert (report.communication_bytes, report.communication_s, report.collectives) == (0, 0, {})
    assert report.step_s_full_overlap == report.step_s_no_overlap == report.compute_s
    line = json.loads(report.json_line())
    assert line["mfu_no_overlap"] == pytest.approx(report.model_flops_per_step / (4 * 197e12 * report.compute_s))
    for key in ("per_chip_bytes", "hbm_bytes", "compute_s", "communication_s", "step_s_full_overlap",
                "step_s_no_overlap"):
        assert line[key] == pytest.approx(getattr(report, key))
    aot.check_fits(report)


def test_a_positive_compiler_estimate_is_the_step_time():
    report = _report(1 << 30, _scanned_matmuls_hlo(2), optimal_seconds=0.25)
    assert (report.compute_s, report.compute_source) == (0.25, "compiler")


def test_a_step_that_does_not_fit_fails_naming_the_figures_and_fixes():
    report = _report(20 << 30, _scanned_matmuls_hlo(2))
    assert not report.fits
    with pytest.raises(aot.DoesNotFit, match=r"20\.00 GiB per chip on v5e:2x2 but a chip has 16 GiB") as err:
        aot.check_fits(report)
    assert "config.data.batch_size" in str(err.value) and "remat" in str(err.value)


def test_unknown_chip_is_named():
    with pytest.raises(ValueError, match="unknown chip 'v9'"):
        aot.chip_name("v9:2x2")


def _aot_cli(cache, *overrides):
    command = [TPU_PYTHON, "train.py", "--config", "shapes_dalle:tiny", "--aot_topology", "v5e:2x2",
               *overrides]
    env = subprocess_env(cache)
    del env["JAX_PLATFORMS"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_cli_compiles_the_tiny_seq2seq_step_for_a_v5e_slice(compilation_cache):
    result = _aot_cli(compilation_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["chips"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["fits"] and 0 < report["per_chip_bytes"] < report["hbm_bytes"] == 16 * aot.GiB
    assert report["per_chip_bytes"] == sum(report[k] for k in ("argument_bytes", "output_bytes", "temp_bytes",
                                                                 "code_bytes"))
    # Scanned layers are loops, whose bodies XLA counts once: below a chip's quarter of the model's FLOPs.
    assert report["loops"] >= 2 and 0 < report["compiler_flops_per_chip"] < report["model_flops_per_step"] / 4
    # The compute time is libtpu's own cycle estimate, with the decoder's 2 scanned layers run twice (forward,
    # backward).
    assert report["compute_source"] == "compiler cycles" and report["loop_trips"].count(2) == 2
    assert report["compute_s"] == pytest.approx(report["compiler_cycles"] / 1.5e9)
    # Data parallel over 4 chips: the gradients are all-reduced, at least once per parameter byte (f32 or bf16).
    assert report["collectives"]["all-reduce"]["bytes"] > 0 and report["communication_s"] > 0
    assert report["step_s_no_overlap"] == pytest.approx(report["compute_s"] + report["communication_s"])
    assert 0 < report["mfu_no_overlap"] < report["mfu_full_overlap"] < 1
    assert "communication" in result.stdout and "without a cycle figure" in result.stdout
    assert "per-chip memory" in result.stdout


@needs_libtpu
def test_cli_fails_clearly_when_the_step_does_not_fit(compilation_cache):
    result = _aot_cli(compilation_cache, "--config.data.batch_size=1048576")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: The seq2seq train step does not fit on v5e:2x2 at a global batch of 1048576")
    assert "exceeds available HBM" in error and "config.data.batch_size" in error
