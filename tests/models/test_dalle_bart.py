"""DalleBart: layout against a NumPy reference, causality, text padding, scan/unroll, remat, names, errors."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dalle_jax.models import transformer_layers as tl
from dalle_jax.models.dalle_bart import (
    MASKED_LOGIT, DalleBart, padded_image_vocab_size, teacher_forcing_inputs, unrolled_equivalent, validate_config)
from dalle_jax.models.seq2seq_loss import image_token_loss

# The tests' programs are tiny: LLVM's optimisations would cost more compile time than they save at run time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

CODEBOOK = 32
TEXT = np.array([[0, 5, 6, 7, 2, 1, 1, 1],
                 [0, 9, 2, 1, 1, 1, 1, 1]], dtype=np.int32)
REAL_TEXT = TEXT != 1
IMAGE_TOKENS = np.random.default_rng(0).integers(0, CODEBOOK, size=(2, 16)).astype(np.int32)
IMAGE_INPUTS = np.asarray(teacher_forcing_inputs(jnp.asarray(IMAGE_TOKENS), CODEBOOK))


def make_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        text_vocab_size=40, text_length=8, image_vocab_size=CODEBOOK, image_length=16, d_model=32,
        encoder_layers=2, decoder_layers=2, heads=4, ffn_dim=48, ffn="glu", dropout=0.0, dtype="float32",
        param_dtype="float32", scan_layers=True, remat="none", vocab_multiple=128, image_positions="flat",
        layer_norm_variance="two_pass"))
    cfg.update(overrides)
    return cfg


def abstract_model(cfg) -> DalleBart:
    return nnx.eval_shape(lambda: DalleBart(cfg, rngs=nnx.Rngs(params=0, dropout=1)))


def model_from_pure(cfg, pure: dict) -> DalleBart:
    """A model of `cfg` holding the given values (keeps `cfg`'s own variable metadata)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def stack_layers(pure: dict) -> dict:
    """Unrolled pure state -> scanned pure state: each `layers` list becomes one stacked subtree."""
    out = {}
    for part in ("encoder", "decoder"):
        sub = dict(pure[part])
        layers = sub["layers"]
        sub["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])
        out[part] = sub
    return out


@pytest.fixture(scope="module")
def unrolled_pure():
    """Unrolled model state with every parameter random (so norms' scales and biases matter too). Built from the
    abstract model: running the initializers eagerly would compile one op per parameter shape."""
    rng = np.random.default_rng(1)
    streams = iter(range(1000))

    def fill(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(next(streams))
        if jnp.issubdtype(x.dtype, jnp.integer):
            return np.zeros(x.shape, x.dtype)
        return rng.normal(0.0, 0.3, x.shape).astype(x.dtype)

    return jax.tree.map(fill, nnx.state(abstract_model(make_cfg(scan_layers=False))).to_pure_dict())


@pytest.fixture(scope="module")
def forward():
    """One compiled forward per model structure: `f(model, text, image_inputs, delta)` adds `delta` to the
    encoder states before decoding (zero gives the plain forward)."""
    compiled = {}

    def run(model, text=TEXT, image_inputs=IMAGE_INPUTS, delta=None):
        graphdef, state = nnx.split(model)
        if graphdef not in compiled:
            def f(state, text, image_inputs, delta):
                m = nnx.merge(graphdef, state)
                return m.decode(image_inputs, m.encode(text) + delta, text)
            compiled[graphdef] = jit(f)
        if delta is None:
            delta = np.zeros(text.shape + (model.encoder.final_ln.scale.shape[-1],), np.float32)
        return np.asarray(compiled[graphdef](state, text, image_inputs, delta))

    return run


# ---- NumPy reference of the layout (independent of the Flax code) ----

def np_layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_attention(p, x, kv, allowed, heads):
    b, lq, d = x.shape
    hd = d // heads
    q = (x @ p["q_proj"]["kernel"]).reshape(b, lq, heads, hd) / math.sqrt(hd)
    k = (kv @ p["k_proj"]["kernel"]).reshape(b, kv.shape[1], heads, hd)
    v = (kv @ p["v_proj"]["kernel"]).reshape(b, kv.shape[1], heads, hd)
    s = np.einsum("bqhd,bkhd->bhqk", q, k)
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, lq, d) @ p["out_proj"]["kernel"]


def np_glu(p, x):
    z = np_layer_norm(x, p["ln0"])
    w = np_gelu(z @ p["fc0"]["kernel"])
    return np_layer_norm(w * (z @ p["fc1"]["kernel"]), p["ln1"]) @ p["fc2"]["kernel"]


def np_dalle_bart(pure, text, image_inputs, heads=4):
    e, d = pure["encoder"], pure["decoder"]
    text_allowed = (text != 1)[:, None, None, :]
    x = e["embed_tokens"]["embedding"][text] + e["embed_positions"]["embedding"][: text.shape[1]]
    x = np_layer_norm(x, e["layernorm_embedding"])
    for i in sorted(e["layers"]):
        p = e["layers"][i]
        h = np_layer_norm(x, p["pre_self_attn_layer_norm"])
        x = x + np_layer_norm(np_attention(p["self_attn"], h, h, text_allowed, heads), p["self_attn_layer_norm"])
        x = x + np_glu(p["ffn"], x)
    enc = np_layer_norm(x, e["final_ln"])

    length = image_inputs.shape[1]
    causal = np.tril(np.ones((length, length), bool))[None, None]
    y = d["embed_tokens"]["embedding"][image_inputs] + d["embed_positions"]["embedding"][:length]
    y = np_layer_norm(y, d["layernorm_embedding"])
    for i in sorted(d["layers"]):
        p = d["layers"][i]
        h = np_layer_norm(y, p["pre_self_attn_layer_norm"])
        y = y + np_layer_norm(np_attention(p["self_attn"], h, h, causal, heads), p["self_attn_layer_norm"])
        h = np_layer_norm(y, p["pre_encoder_attn_layer_norm"])
        y = y + np_layer_norm(np_attention(p["encoder_attn"], h, enc, text_allowed, heads),
                              p["encoder_attn_layer_norm"])
        y = y + np_glu(p["ffn"], y)
    logits = np_layer_norm(y, d["final_ln"]) @ d["lm_head"]["kernel"]
    logits[..., CODEBOOK:] = MASKED_LOGIT
    return logits


def numpy_params(pure):
    return jax.tree.map(lambda x: np.asarray(x, np.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, pure)


# ---- tests ----

def test_unrolled_matches_numpy_reference(unrolled_pure, forward):
    model = model_from_pure(make_cfg(scan_layers=False), unrolled_pure)
    expected = np_dalle_bart(numpy_params(unrolled_pure), TEXT, IMAGE_INPUTS)
    np.testing.assert_allclose(forward(model), expected, rtol=2e-4, atol=2e-4)


def test_scanned_equals_unrolled(unrolled_pure, forward):
    unrolled = forward(model_from_pure(make_cfg(scan_layers=False), unrolled_pure))
    scanned = forward(model_from_pure(make_cfg(scan_layers=True), stack_layers(unrolled_pure)))
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-6, atol=1e-6)


def _leaf_values(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                                             else x), tree)


def test_unrolled_equivalent_splits_each_stack_into_its_layers(unrolled_pure):
    unrolled = unrolled_pure
    cfg = make_cfg(scan_layers=True)
    got_cfg, got = unrolled_equivalent(cfg, stack_layers(unrolled))
    assert got_cfg.scan_layers is False and cfg.scan_layers is True  # the given config is left as it was
    assert jax.tree.structure(got) == jax.tree.structure(unrolled)
    jax.tree.map(np.testing.assert_array_equal, _leaf_values(got), _leaf_values(unrolled))
    unrolled_cfg = make_cfg(scan_layers=False)
    same_cfg, same = unrolled_equivalent(unrolled_cfg, unrolled)
    assert same_cfg is unrolled_cfg and same is unrolled


def test_logits_shape_dtype_and_masked_columns(unrolled_pure, forward):
    pure = stack_layers(unrolled_pure)
    logits = forward(model_from_pure(make_cfg(), pure))
    assert logits.shape == (2, 16, 128) and logits.dtype == np.float32
    assert np.all(logits[..., CODEBOOK:] == MASKED_LOGIT)
    assert np.all(logits[..., :CODEBOOK] > MASKED_LOGIT / 2)

    # With the final norm giving an all-ones hidden state, a logit is its head column's sum. Columns past the
    # codebook (the start token, the padding) summing far above the rest are still never the argmax...
    pure["decoder"]["final_ln"] = {"scale": np.zeros(32, np.float32), "bias": np.ones(32, np.float32)}
    head = np.array(pure["decoder"]["lm_head"]["kernel"])
    head[:, CODEBOOK:] = 10.0
    pure["decoder"]["lm_head"]["kernel"] = head
    assert forward(model_from_pure(make_cfg(), pure)).argmax(-1).max() < CODEBOOK
    # ...while the same on a codebook column wins everywhere.
    head[:, 5] = 10.0
    assert np.all(forward(model_from_pure(make_cfg(), pure)).argmax(-1) == 5)


def test_decoder_is_causal(unrolled_pure, forward):
    model = model_from_pure(make_cfg(), stack_layers(unrolled_pure))
    base = forward(model)
    for t in (0, 7, 14):
        tokens = IMAGE_TOKENS.copy()
        tokens[:, t] = (tokens[:, t] + 1) % CODEBOOK
        changed = forward(model, image_inputs=np.asarray(teacher_forcing_inputs(jnp.asarray(tokens), CODEBOOK)))
        np.testing.assert_array_equal(changed[:, : t + 1], base[:, : t + 1])
        assert np.abs(changed[:, t + 1] - base[:, t + 1]).max() > 1e-3


def test_text_padding_is_ignored(unrolled_pure, forward):
    pure = stack_layers(unrolled_pure)
    base = forward(model_from_pure(make_cfg(), pure))

    # Encoder states at padded positions never reach the decoder...
    noise = np.random.default_rng(2).normal(size=TEXT.shape + (32,)).astype(np.float32)
    at_pads = forward(model_from_pure(make_cfg(), pure), delta=noise * ~REAL_TEXT[..., None])
    np.testing.assert_allclose(at_pads, base, rtol=1e-6, atol=1e-6)
    at_reals = forward(model_from_pure(make_cfg(), pure), delta=noise * REAL_TEXT[..., None])
    assert np.abs(at_reals - base).max() > 1e-3

    # ...nor does the `<pad>` embedding, which the encoder's self-attention must mask too.
    table = np.array(pure["encoder"]["embed_tokens"]["embedding"])
    for token, should_change in ((1, False), (5, True)):
        changed = dict(pure, encoder=dict(pure["encoder"], embed_tokens={"embedding": table.copy()}))
        changed["encoder"]["embed_tokens"]["embedding"][token] += noise[0, 0]
        out = forward(model_from_pure(make_cfg(), changed))
        if should_change:
            assert np.abs(out - base).max() > 1e-3
        else:
            np.testing.assert_allclose(out, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_every_parameter_has_logical_names(scan):
    model = abstract_model(make_cfg(scan_layers=scan))
    params = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(params)
    flat_specs = dict(nnx.to_flat_state(specs))
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value().shape) and None not in names, (path, names)
        assert flat_specs[path].get_value() == P(*names)
        assert (names[0] == tl.LAYERS_AXIS) == (scan and "layers" in path), (path, names)
    expected = {
        ("encoder", "embed_tokens", "embedding"): ("vocab", "embed"),
        ("decoder", "embed_positions", "embedding"): ("length", "embed"),
        ("decoder", "lm_head", "kernel"): ("embed", "vocab"),
        ("decoder", "final_ln", "scale"): ("norm",),
    }
    layer = ("decoder", "layers") + (() if scan else (0,))
    lead = (tl.LAYERS_AXIS,) if scan else ()
    expected.update({
        layer + ("encoder_attn", "q_proj", "kernel"): lead + ("embed", "heads"),
        layer + ("self_attn", "out_proj", "kernel"): lead + ("heads", "embed"),
        layer + ("ffn", "fc1", "kernel"): lead + ("embed", "mlp"),
        layer + ("ffn", "fc2", "kernel"): lead + ("mlp", "embed"),
        layer + ("ffn", "ln1", "bias"): lead + ("norm",),
    })
    names = {path: var.get_metadata()["out_sharding"] for path, var in nnx.to_flat_state(params)}
    for path, want in expected.items():
        assert tuple(names[path]) == want, path


def test_shapes_dtypes_and_mlp_option():
    for overrides in ({}, {"ffn": "mlp"}, {"dtype": "bfloat16"}, {"vocab_multiple": 1}):
        cfg = make_cfg(**overrides)
        model = abstract_model(cfg)
        graphdef, state = nnx.split(model)
        out = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(TEXT, IMAGE_INPUTS), state)
        vocab = padded_image_vocab_size(CODEBOOK, cfg.vocab_multiple)
        assert out.shape == (2, 16, vocab) and out.dtype == jnp.float32, overrides
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param))), overrides
    assert padded_image_vocab_size(32, 1) == 33 and padded_image_vocab_size(16384, 128) == 16512
    assert model.decoder.embed_tokens.embedding.shape == (CODEBOOK + 1, 32)
    mlp = abstract_model(make_cfg(ffn="mlp"))
    assert mlp.encoder.layers.ffn.fc1.kernel.shape == (2, 32, 48) and not hasattr(mlp.encoder.layers.ffn, "fc0")


def test_teacher_forcing_inputs_shift_right():
    tokens = jnp.array([[4, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(teacher_forcing_inputs(tokens, 32), [[32, 4, 5], [32, 7, 8]])


def _compiled_loss_and_grads(graphdef, loss):
    @jit
    def loss_and_grads(params, rest):
        return nnx.value_and_grad(loss)(nnx.merge(graphdef, params, rest))

    return loss_and_grads


def _image_token_loss(model):
    logits = model(TEXT, IMAGE_INPUTS, deterministic=False)
    return image_token_loss(logits, IMAGE_TOKENS, num_classes=CODEBOOK, label_smoothing=0.1, z_loss=1e-4)[0]


def test_jit_grad_smoke(unrolled_pure):
    model = model_from_pure(make_cfg(dropout=0.1), stack_layers(unrolled_pure))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_and_grads = _compiled_loss_and_grads(graphdef, _image_token_loss)
    loss, grads = loss_and_grads(params, rest)
    assert np.isfinite(loss)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g.get_value())
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path
    # A small step against the gradient lowers the loss (same dropout masks: the rng state is an input).
    stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)
    new_loss, _ = loss_and_grads(stepped, rest)
    assert new_loss < loss
    # Dropout is active in training mode: other "dropout" keys give another loss.
    other_keys = jax.tree.map(
        lambda x: jax.vmap(jax.random.fold_in, (0, None))(x.reshape(-1), 7).reshape(x.shape)
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, rest)
    assert abs(float(loss_and_grads(params, other_keys)[0]) - float(loss)) > 1e-4


REMAT_CASES = {"none": True, "full": True, "dots": False}  # policy -> scan_layers


@pytest.fixture(scope="module")
def encoder_grads_by_remat(unrolled_pure):
    """Loss and gradients of the encoder (dropout on) under each remat policy, "dots" on the unrolled stack.
    The stack code is shared with the decoder; the encoder alone keeps the three compilations cheap."""
    weights = np.random.default_rng(3).normal(size=TEXT.shape + (32,)).astype(np.float32)
    out = {}
    for remat, scan in REMAT_CASES.items():
        pure = stack_layers(unrolled_pure) if scan else unrolled_pure
        model = model_from_pure(make_cfg(remat=remat, dropout=0.1, scan_layers=scan), pure)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda m: jnp.sum(m.encode(TEXT, deterministic=False) * weights)
        loss_value, grads = _compiled_loss_and_grads(graphdef, loss)(params, rest)
        grads = grads.to_pure_dict()
        out[remat] = loss_value, (grads if scan else stack_layers(grads))["encoder"]
    return out


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_loss_and_gradients(encoder_grads_by_remat, remat):
    loss, grads = encoder_grads_by_remat[remat]
    ref_loss, ref_grads = encoder_grads_by_remat["none"]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads)


@pytest.mark.parametrize("overrides, message", [
    ({"heads": 5}, "heads"),
    ({"ffn": "swiglu"}, "ffn"),
    ({"remat": "some"}, "remat"),
    ({"dtype": "float8"}, "dtype"),
    ({"dropout": 1.0}, "dropout"),
    ({"decoder_layers": 0}, "decoder_layers"),
    ({"encoder_layers": 0}, "encoder_layers=0 must be a positive integer"),
    ({"d_modle": 32}, "d_modle"),
])
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(make_cfg(**overrides))


def test_missing_config_field_is_rejected():
    cfg = make_cfg()
    del cfg["vocab_multiple"]
    with pytest.raises(ValueError, match="vocab_multiple"):
        DalleBart(cfg, rngs=nnx.Rngs(0))


def test_missing_dropout_stream_is_rejected():
    with pytest.raises(ValueError, match="dropout"):
        DalleBart(make_cfg(), rngs=nnx.Rngs(params=0))


def test_bad_inputs_are_rejected():
    model = abstract_model(make_cfg())
    with pytest.raises(ValueError, match="text_length"):
        model.encode(np.zeros((2, 9), np.int32))
    with pytest.raises(ValueError, match="image_length"):
        model(TEXT, np.zeros((2, 17), np.int32))
    with pytest.raises(ValueError, match="shape"):
        model.encode(np.zeros((8,), np.int32))
    with pytest.raises(ValueError, match="integer"):
        model.encode(np.zeros((2, 8), np.float32))
