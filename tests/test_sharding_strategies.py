"""Sharding strategies of the seq2seq step on an 8-device CPU mesh: data parallel, FSDP, tensor parallel and their
combinations; bf16 compute over f32 master weights; remat policies; scanned layers.

Everything is measured from abstract states and lowered (never executed) steps, in one subprocess.
"""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

_MEASURE = r"""
import json
import jax
import numpy as np
from dalle_jax.configs import shapes_dalle
from dalle_jax import parallel
from dalle_jax.pods import aot
from dalle_jax.trainers import seq2seq_step

def config(mesh=(1, 8, 1), **model):
    c = shapes_dalle.get_config("tiny")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    for k, v in model.items():
        c.model[k] = v
    return c

def device_bytes(tree):
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))

def lower(c):
    return aot.lower_train_step(c, parallel.make_mesh(c.mesh))

out = dict(bytes={}, specs={})
for mesh in [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2)]:
    _, _, state = aot.abstract_state(seq2seq_step, config(mesh), parallel.make_mesh(config(mesh).mesh))
    name = "x".join(map(str, mesh))
    out["bytes"][name] = dict(params=device_bytes(state["params"]), opt_state=device_bytes(state["opt_state"]))
    out["specs"][name] = {jax.tree_util.keystr(path): [a if a is None or isinstance(a, str) else list(a)
                                                       for a in x.sharding.spec]
                          for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}

adafactor = config()
adafactor.optimizer.name, adafactor.optimizer.b1 = "adafactor", 0.0
_, _, state = aot.abstract_state(seq2seq_step, adafactor, parallel.make_mesh(adafactor.mesh))
out["adafactor_opt_state"] = device_bytes(state["opt_state"])
_, _, state = aot.abstract_state(seq2seq_step, config(dtype="bfloat16"), parallel.make_mesh(config().mesh))
out["param_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves(state["params"])})
flops = {}
for remat in ("none", "dots", "full"):
    lowered = lower(config(dtype="bfloat16", remat=remat))
    flops[remat] = float(lowered.cost_analysis()["flops"])
    if remat == "none":
        dots = [line.split("->")[-1] for line in lowered.as_text().splitlines() if "stablehlo.dot_general" in line]
        out["dot_results"] = dict(total=len(dots), bf16=sum("xbf16>" in d for d in dots))
out["remat_flops"] = flops
out["hlo_chars"] = {f"{'scan' if scan else 'unrolled'}_{n}": len(lower(config(
    scan_layers=scan, encoder_layers=n, decoder_layers=n)).as_text()) for scan, n in
    [(True, 2), (True, 8), (False, 2), (False, 4)]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured(compilation_cache):
    result = subprocess.run([sys.executable, "-c", _MEASURE], cwd=REPO, capture_output=True, text=True,
                            env=subprocess_env(compilation_cache, devices=8), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_per_device_parameter_and_optimizer_bytes_fall_as_one_over_fsdp(measured):
    """bytes(fsdp=k) = replicated + sharded / k exactly; the replicated part (norm scales) is small."""
    b = {k: measured["bytes"][f"{8 // k}x{k}x1"] for k in (1, 2, 4, 8)}
    for part in ("params", "opt_state"):
        sharded = 2 * (b[1][part] - b[2][part])
        replicated = b[1][part] - sharded
        assert 0 <= replicated < 0.05 * b[1][part]
        for k in (4, 8):
            assert b[k][part] == replicated + sharded // k
    # AdamW keeps two moments per parameter, sharded alike.
    assert b[8]["opt_state"] == pytest.approx(2 * b[8]["params"], rel=1e-3)


def test_adafactor_state_shards_over_fsdp_and_is_smaller_than_adams(measured):
    """Its moments (factored rows and columns, (1,) placeholders) have other shapes than their parameters; they
    must still get valid shardings. One second moment and no first: about half of AdamW's two."""
    assert 0 < measured["adafactor_opt_state"] < 0.6 * measured["bytes"]["1x8x1"]["opt_state"]


def test_fsdp_shards_the_model_width_and_tensor_splits_heads_mlp_and_vocabulary(measured):
    fsdp, tensor, both = (measured["specs"][m] for m in ("1x8x1", "4x1x2", "2x2x2"))
    query = next(k for k in fsdp if "q_proj" in k and "kernel" in k)
    assert "fsdp" in fsdp[query] and "tensor" not in json.dumps(fsdp[query])
    assert "tensor" in tensor[query] and "fsdp" not in json.dumps(tensor[query])
    assert "fsdp" in both[query] and "tensor" in both[query]
    # Heads (q/k/v/out projections), MLP (fc0/fc1/fc2), the output head and the text embedding split over tensor.
    for needle in ("q_proj", "k_proj", "v_proj", "out_proj", "fc0", "fc1", "fc2", "lm_head",
                   "['encoder']['embed_tokens']"):
        names = [k for k in tensor if needle in k]
        assert names and all("tensor" in json.dumps(tensor[k]) for k in names), needle
    # Pure data parallelism replicates every parameter.
    assert all(all(a is None for a in spec) for spec in measured["specs"]["8x1x1"].values())
    # Tensor parallelism alone shards less than FSDP (only heads, MLP and vocabulary), but it does shard.
    b = measured["bytes"]
    assert b["1x8x1"]["params"] < b["4x1x2"]["params"] < b["8x1x1"]["params"]
    assert b["2x2x2"]["params"] < b["4x2x1"]["params"]


def test_bf16_compute_over_f32_master_weights(measured):
    assert measured["param_dtypes"] == ["float32"]
    dots = measured["dot_results"]
    # The matmuls of the layers run in bf16; a few (loss, norms of gradients) stay f32.
    assert dots["bf16"] >= 0.8 * dots["total"] > 0


def test_remat_policies_recompute_more_as_they_save_less(measured):
    flops = measured["remat_flops"]
    assert flops["none"] < flops["dots"] < flops["full"]


def test_scanned_layers_lower_to_the_same_program_whatever_the_depth(measured):
    chars = measured["hlo_chars"]
    assert chars["scan_8"] <= 1.02 * chars["scan_2"]
    # Unrolled layers grow the program with depth: the comparison above can tell the difference.
    assert chars["unrolled_4"] > 1.5 * chars["unrolled_2"]
