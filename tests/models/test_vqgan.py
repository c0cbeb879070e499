"""VQGAN: taming's module layout, logical axes, shapes, decode identities, building blocks against numpy references,
config and input errors, and a jit + grad run of the whole model."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import dalle_jax  # noqa: F401  (sets the flax config the project relies on)
from dalle_jax.models.conv_layers import AttnBlock, Downsample, ResnetBlock, Upsample
from dalle_jax.models.vqgan import VQGAN


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(resolution=16, in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(8,), z_channels=8, embed_dim=4, codebook_size=32, beta=0.25,
               l2_normalize_codes=False, num_groups=4, dropout=0.0, dtype="float32",
               local_encoder=False)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def rngs(seed=0):
    # "rbg" keys compile much faster than threefry on CPU; the tests do not depend on the generator.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def abstract_model(cfg):
    """Shapes and metadata only: no arrays are computed."""
    return nnx.eval_shape(lambda: VQGAN(cfg, rngs=nnx.Rngs(0)))


def flat_params(model) -> dict:
    return {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def random_values(shape, rng):
    """Kernels ~ N(0, 1/fan_in); 1-d parameters (biases, norm scales) ~ N(0, 0.3^2), so nothing is trivial."""
    if len(shape) == 4:
        return rng.normal(size=shape) / np.sqrt(np.prod(shape[:3]))
    return rng.normal(size=shape) * (1.0 if len(shape) == 2 else 0.3)


def randomize(module, seed):
    """Fills every parameter of a (possibly abstract) module with seeded random values, in place."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda a: jnp.asarray(random_values(a.shape, rng), jnp.float32), state))
    return module


def build(factory, seed):
    """A layer built abstractly and filled with seeded random parameters."""
    return randomize(nnx.eval_shape(lambda: factory(nnx.Rngs(0))), seed)


def images(batch=2, side=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=(batch, side, side, 3)).astype(np.float32))


# numpy references (float64) -------------------------------------------------------------------------------------

def np_conv(x, kernel, bias, stride=1, pad=((0, 0), (0, 0))):
    x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    kh, kw = kernel.shape[:2]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros(x.shape[:1] + (oh, ow, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride] @ kernel[i, j]
    return out + bias


def np_group_norm(x, groups, scale, bias):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
    return g.reshape(x.shape) * scale + bias


def np_swish(x):
    return x / (1 + np.exp(-x))


def p(layer, name):
    return np.asarray(getattr(layer, name)[...], np.float64)


def np_conv_layer(layer, x, **kw):
    return np_conv(x, p(layer, "kernel"), p(layer, "bias"), **kw)


def np_norm(layer, x, groups):
    return np_group_norm(x, groups, p(layer, "scale"), p(layer, "bias"))


SAME3 = ((1, 1), (1, 1))


# the whole model --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    # Built abstractly and filled from numpy: the same module, without compiling one initializer per shape.
    return randomize(abstract_model(tiny_config()), 0)


@pytest.fixture(scope="module")
def run(model):
    """One compiled program: a training-style loss with its gradients, plus every decode path."""
    x = images()

    @nnx.jit
    def forward_and_grad(model, x):
        def loss(model):
            x_rec, aux = model(x)
            return jnp.mean(jnp.abs(x_rec - x)) + aux["codebook_loss"] + aux["commitment_loss"], (x_rec, aux)

        (value, (x_rec, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        z_q, indices, encode_aux = model.encode(x)
        return dict(loss=value, x_rec=x_rec, aux=aux, grads=grads, z_q=z_q, indices=indices,
                    encode_aux=encode_aux, from_z=model.decode(z_q), from_codes=model.decode_code(indices),
                    via_last_layer=model.decoder.conv_out(model.last_layer_input(z_q)),
                    codes=model.quantize.codes(indices))

    return x, forward_and_grad(model, x)


def test_parameter_paths_follow_taming_layout(model):
    params = {k: v.shape for k, v in flat_params(model).items()}
    expected = {
        "encoder/conv_in/kernel": (3, 3, 3, 16),
        "encoder/down/0/block/0/conv1/kernel": (3, 3, 16, 16),
        "encoder/down/0/downsample/conv/kernel": (3, 3, 16, 16),
        "encoder/down/1/block/0/nin_shortcut/kernel": (1, 1, 16, 32),
        "encoder/down/1/attn/0/q/kernel": (1, 1, 32, 32),
        "encoder/mid/attn_1/proj_out/kernel": (1, 1, 32, 32),
        "encoder/mid/block_2/norm2/scale": (32,),
        "encoder/norm_out/scale": (32,),
        "encoder/conv_out/kernel": (3, 3, 32, 8),
        "quant_conv/kernel": (1, 1, 8, 4),
        "quantize/embedding": (32, 4),
        "post_quant_conv/kernel": (1, 1, 4, 8),
        "decoder/conv_in/kernel": (3, 3, 8, 32),
        "decoder/up/1/block/1/conv2/kernel": (3, 3, 32, 32),
        "decoder/up/1/attn/1/k/kernel": (1, 1, 32, 32),
        "decoder/up/1/upsample/conv/kernel": (3, 3, 32, 32),
        "decoder/up/0/block/0/nin_shortcut/kernel": (1, 1, 32, 16),
        "decoder/up/0/block/1/norm1/scale": (16,),
        "decoder/norm_out/bias": (16,),
        "decoder/conv_out/kernel": (3, 3, 16, 3),
    }
    for name, shape in expected.items():
        assert params.get(name) == shape, f"{name}: {params.get(name)} != {shape}"
    # Attention only at side 8 (level 1); a shortcut only where channels change; no resampling at the ends.
    assert not any(k.startswith(("encoder/down/0/attn", "decoder/up/0/attn")) for k in params)
    assert not any(k.startswith(("encoder/down/1/downsample", "decoder/up/0/upsample")) for k in params)
    assert not any("nin_shortcut" in k for k in params
                   if k.startswith(("encoder/down/0/", "decoder/up/1/", "encoder/mid", "decoder/mid")))
    decoder_blocks = {k.split("/")[4] for k in params if k.startswith("decoder/up/0/block/")}
    assert decoder_blocks == {"0", "1"}  # num_res_blocks + 1


def test_every_parameter_has_logical_axes(model):
    params = flat_params(model)
    assert len(params) > 100
    for name, v in params.items():
        axes = v.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(v.shape), name
        if name == "quantize/embedding":
            assert axes == ("codebook", "code")
        elif name.endswith("kernel"):
            assert axes == (None, None, "conv_in", "conv_out"), name
        elif "norm" in name.rsplit("/", 2)[-2]:
            assert axes == ("norm",), name
        else:
            assert name.endswith("bias") and axes == ("conv_out",), name


def test_shapes_and_grid_size(model, run):
    x, out = run
    assert model.grid_size == 8
    assert out["z_q"].shape == (2, 8, 8, 4) and out["z_q"].dtype == jnp.float32
    assert out["indices"].shape == (2, 8, 8) and out["indices"].dtype == jnp.int32
    indices = np.asarray(out["indices"])
    assert indices.min() >= 0 and indices.max() < 32
    assert out["x_rec"].shape == x.shape and out["x_rec"].dtype == jnp.float32
    assert out["aux"]["z_e"].shape == (2, 8, 8, 4)
    assert out["aux"]["codebook_loss"].shape == () and out["aux"]["commitment_loss"].shape == ()
    np.testing.assert_array_equal(out["aux"]["indices"], out["indices"])


def test_decode_paths_agree(run):
    _, out = run
    np.testing.assert_allclose(out["from_codes"], out["from_z"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["via_last_layer"], out["from_z"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["x_rec"], out["from_z"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["z_q"], out["codes"], rtol=1e-6, atol=1e-6)


def test_model_losses_match_their_definition(run):
    _, out = run
    gap = np.mean((np.asarray(out["aux"]["z_e"]) - np.asarray(out["codes"])) ** 2)
    np.testing.assert_allclose(out["aux"]["codebook_loss"], gap, rtol=1e-5)
    np.testing.assert_allclose(out["aux"]["commitment_loss"], 0.25 * gap, rtol=1e-5)


def test_jit_grad_reaches_encoder_codebook_and_decoder(run):
    _, out = run
    assert np.isfinite(out["loss"])
    grads = {k: np.asarray(v[...]) for k, v in flat_params(out["grads"]).items()}
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    for name in ("encoder/conv_in/kernel", "encoder/down/1/attn/0/v/kernel", "quant_conv/kernel",
                 "quantize/embedding", "post_quant_conv/kernel", "decoder/conv_out/kernel"):
        assert np.abs(grads[name]).max() > 0, name


def minimal_config(**overrides):
    return tiny_config(**{**dict(resolution=8, ch=8, ch_mult=(1,), attn_resolutions=(), z_channels=8, embed_dim=8,
                                 codebook_size=64, num_groups=2), **overrides})


@pytest.fixture(scope="module")
def initialised():
    """A minimal model through the real initializers (the tiny fixture model is filled from numpy instead)."""
    return VQGAN(minimal_config(), rngs=rngs(1))


def test_initialisation_follows_taming_defaults(initialised):
    params = {k: np.asarray(v[...]) for k, v in flat_params(initialised).items()}
    assert all(v.dtype == np.float32 for v in params.values())
    for name, value in params.items():
        if name.endswith("bias"):
            np.testing.assert_array_equal(value, 0.0, err_msg=name)
        elif name.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0, err_msg=name)
        elif value.shape == (3, 3, 8, 8):  # PyTorch's default conv init: variance 1 / (3 fan_in)
            np.testing.assert_allclose(value.std(), np.sqrt(1 / (3 * 72)), rtol=0.15, err_msg=name)
    codebook = params["quantize/embedding"]
    assert codebook.shape == (64, 8) and np.abs(codebook).max() <= 1 / 64 and codebook.std() > 0


def test_bfloat16_compute_tracks_float32():
    model32 = randomize(abstract_model(minimal_config()), 7)
    model16 = randomize(abstract_model(minimal_config(dtype="bfloat16")), 7)  # the same parameters
    assert all(v[...].dtype == jnp.float32 for v in flat_params(model16).values())
    forward = nnx.jit(lambda m, x: m(x))
    x = images(side=8)
    (x_rec32, aux32), (x_rec16, aux16) = forward(model32, x), forward(model16, x)
    assert x_rec16.dtype == jnp.float32 and aux16["z_e"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(x_rec16)))
    z32, z16 = np.asarray(aux32["z_e"]), np.asarray(aux16["z_e"])
    assert np.linalg.norm(z16 - z32) / np.linalg.norm(z32) < 0.05


# building blocks against numpy ----------------------------------------------------------------------------------

def test_downsample_pads_bottom_right_then_strides():
    layer = build(lambda r: Downsample(4, dtype=jnp.float32, rngs=r), 2)
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 4))
    expected = np_conv_layer(layer.conv, x, stride=2, pad=((0, 1), (0, 1)))
    out = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x, jnp.float32))
    assert out.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_upsample_is_nearest_then_conv():
    layer = build(lambda r: Upsample(4, dtype=jnp.float32, rngs=r), 3)
    x = np.random.default_rng(3).normal(size=(1, 3, 5, 4))
    nearest = x.repeat(2, axis=1).repeat(2, axis=2)
    expected = np_conv_layer(layer.conv, nearest, pad=SAME3)
    out = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_resnet_block_with_shortcut_matches_reference():
    block = build(lambda r: ResnetBlock(4, 8, num_groups=2, dropout=0.0, dtype=jnp.float32, rngs=r), 4)
    x = np.random.default_rng(4).normal(size=(2, 4, 4, 4))
    h = np_conv_layer(block.conv1, np_swish(np_norm(block.norm1, x, 2)), pad=SAME3)
    h = np_conv_layer(block.conv2, np_swish(np_norm(block.norm2, h, 2)), pad=SAME3)
    expected = np_conv_layer(block.nin_shortcut, x) + h
    out = nnx.jit(lambda m, x: m(x))(block, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_attention_block_matches_reference():
    block = build(lambda r: AttnBlock(4, num_groups=2, dtype=jnp.float32, rngs=r), 5)
    x = np.random.default_rng(5).normal(size=(2, 3, 3, 4))
    h = np_norm(block.norm, x, 2)
    q, k, v = (np_conv_layer(getattr(block, n), h).reshape(2, 9, 4) for n in "qkv")
    logits = q @ k.transpose(0, 2, 1) / 2.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = x + np_conv_layer(block.proj_out, (weights @ v).reshape(2, 3, 3, 4))
    out = nnx.jit(lambda m, x: m(x))(block, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_dropout_needs_a_key_and_follows_it():
    block = build(lambda r: ResnetBlock(4, 4, num_groups=2, dropout=0.5, dtype=jnp.float32, rngs=r), 6)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 4, 4, 4)), jnp.float32)
    apply = nnx.jit(lambda m, x, key: m(x, deterministic=False, rngs=nnx.Rngs(dropout=key)))
    a, b, c = (apply(block, x, jax.random.key(s, impl="rbg")) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, nnx.jit(lambda m, x: m(x))(block, x))

    with_dropout = abstract_model(tiny_config(resolution=8, ch_mult=(1,), attn_resolutions=(), dropout=0.1))
    with pytest.raises(ValueError, match="rngs"):
        with_dropout(images(side=8), deterministic=False)


# errors -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(num_groups=5), "num_groups=5"),
    (dict(ch=12, num_groups=8), "num_groups=8"),
    (dict(resolution=17), "resolution=17"),
    (dict(attn_resolutions=(4,)), "attn_resolutions"),
    (dict(dtype="float16"), "dtype='float16'"),
    (dict(ch_mult=()), "ch_mult"),
])
def test_bad_config_raises_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        VQGAN(tiny_config(**overrides), rngs=nnx.Rngs(0))


def test_missing_config_field_raises():
    cfg = tiny_config()
    del cfg["l2_normalize_codes"]
    with pytest.raises(ValueError, match="l2_normalize_codes"):
        VQGAN(cfg, rngs=nnx.Rngs(0))


def test_bad_inputs_raise(model):
    with pytest.raises(TypeError, match="127.5"):
        model.encode(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        model.encode(np.zeros((1, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 2"):
        model.encode(np.zeros((1, 15, 16, 3), np.float32))
    with pytest.raises(ValueError, match="decode_code"):
        model.decode(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode_code(np.zeros((1, 64), np.int32))
