"""The seq2seq step's pieces: gradient accumulation, caption blanking, input-token noise, parameter shardings on a
2x2x2 mesh."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dalle_jax.configs import shapes_dalle
from dalle_jax import parallel
from dalle_jax.trainers import seq2seq_step
from tests.conftest import REPO, subprocess_env


def tiny_config(accumulation_steps=1):
    config = shapes_dalle.get_config("tiny")
    config.optimizer.accumulation_steps = accumulation_steps
    config.model.dropout = 0.0
    return config


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, lt = config.data.batch_size, config.model.text_length
    text = rng.integers(4, config.model.text_vocab_size, (b, lt)).astype(np.int32)
    lengths = rng.integers(3, lt, b)
    text[np.arange(lt)[None] >= lengths[:, None]] = 1
    codes = rng.integers(0, config.model.image_vocab_size, (b, config.model.image_length)).astype(np.int32)
    return text, codes


def test_accumulated_micro_batches_equal_one_large_batch(compilation_cache):
    """4 micro-batches of 2 give the gradients and metrics of one batch of 8."""
    results = []
    for k in (1, 4):
        config = tiny_config(k)
        mesh = parallel.make_mesh(config.mesh)
        setup, state, _ = seq2seq_step.create(config, mesh)
        text, codes = random_batch(config)
        fn = jax.jit(functools.partial(seq2seq_step.gradients, setup))
        results.append(jax.device_get(fn(state["params"], text, codes, jax.random.key(0))))
    (grads_1, metrics_1), (grads_4, metrics_4) = results
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_4)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
    assert metrics_4["loss"] == pytest.approx(metrics_1["loss"], rel=1e-5)
    assert metrics_4["token_accuracy"] == pytest.approx(metrics_1["token_accuracy"], abs=1e-6)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_1)) > 0


@pytest.mark.parametrize("prob, expected", [(0.0, 0), (1.0, 64)])
def test_blank_captions_all_or_nothing(prob, expected):
    text = np.arange(64 * 5, dtype=np.int32).reshape(64, 5) + 4
    empty = np.array([0, 2, 1, 1, 1], np.int32)
    out, blank = seq2seq_step.blank_captions(text, empty, prob, jax.random.key(1))
    assert int(blank.sum()) == expected
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(blank)], np.broadcast_to(empty, (expected, 5)))
    np.testing.assert_array_equal(np.asarray(out)[~np.asarray(blank)], text[~np.asarray(blank)])


def test_blank_captions_rate_follows_the_probability():
    text = np.full((4000, 5), 7, np.int32)
    _, blank = seq2seq_step.blank_captions(text, np.zeros(5, np.int32), 0.1, jax.random.key(2))
    assert 0.08 < float(np.mean(blank)) < 0.12


SHARDING_SCRIPT = r"""
import json, jax
from flax import nnx
from dalle_jax.configs import shapes_dalle
from dalle_jax import parallel
from dalle_jax.trainers import seq2seq_step
config = shapes_dalle.get_config("tiny")
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
config.model.d_model, config.model.heads, config.model.ffn_dim = 64, 4, 128
mesh = parallel.make_mesh(config.mesh)
setup, _, shardings = seq2seq_step.create(config, mesh, initialize=False)
abstract = nnx.state(nnx.eval_shape(lambda: seq2seq_step._model(config, 0)), nnx.Param)
out = {}
for path, var in jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    names = var.get_metadata().get("out_sharding") or var.get_metadata().get("sharding_names")
    sh = shardings["params"]
    for p in path:
        sh = sh[getattr(p, "key", p)]
    out[key] = dict(names=list(names), shape=list(var.value.shape), spec=[s if s is None or isinstance(s, str)
                    else list(s) for s in sh.spec], expected=[s if s is None or isinstance(s, str) else list(s)
                    for s in parallel.logical_to_spec(names, var.value.shape, config.sharding_rules, mesh)])
print(json.dumps(out))
"""


def test_parameter_shardings_follow_the_rules(compilation_cache):
    proc = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(compilation_cache, devices=8), timeout=300, check=True)
    params = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, p in params.items():
        spec = p["spec"] + [None] * (len(p["shape"]) - len(p["spec"]))
        assert spec == p["expected"] + [None] * (len(p["shape"]) - len(p["expected"])), key
    # The rules table, spelled out: width over fsdp, heads/mlp/vocab over tensor, the layer axis unsplit.
    q = params["decoder/layers/self_attn/q_proj/kernel"]
    assert q["names"] == ["layers", "embed", "heads"] and q["spec"][:3] == [None, "fsdp", "tensor"]
    assert params["decoder/layers/ffn/fc2/kernel"]["spec"][:3] == [None, "tensor", "fsdp"]
    assert params["decoder/lm_head/kernel"]["spec"] == ["fsdp", "tensor"]
    assert params["encoder/embed_tokens/embedding"]["spec"] == ["tensor", "fsdp"]
    assert all(s is None for s in params["decoder/final_ln/scale"]["spec"])


@pytest.mark.parametrize("field, value", [("blank_caption_prob", -0.5), ("canonical_caption_prob", 1.5)])
def test_caption_probabilities_outside_zero_one_fail_before_any_work(field, value):
    config = tiny_config()
    config.data[field] = value
    with pytest.raises(ValueError, match=f"config.data.{field}={value} must be in"):
        seq2seq_step.check_config(config)
