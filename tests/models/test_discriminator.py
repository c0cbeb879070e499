"""PatchGAN discriminator: patch-map sizes and the minimum input, a numpy reference, per-image independence,
norm variants, logical axes, initialisation and config errors."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import dalle_jax  # noqa: F401  (sets the flax config the project relies on)
from dalle_jax.models.discriminator import PatchDiscriminator, min_input_size, patch_grid_size


def disc_config(**overrides):
    cfg = dict(ch=8, num_layers=3, norm="group", num_groups=4)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def flat_params(model) -> dict:
    return {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def build(cfg, seed):
    """Built abstractly, then every parameter filled with seeded random values (norm scales and biases too)."""
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(lambda: PatchDiscriminator(cfg, rngs=nnx.Rngs(0)))

    def fill(a):
        scale = 1 / np.sqrt(np.prod(a.shape[:3])) if a.ndim == 4 else 0.3
        return jnp.asarray(rng.normal(size=a.shape) * scale, jnp.float32)

    nnx.update(model, jax.tree.map(fill, nnx.state(model, nnx.Param)))
    return model


apply = nnx.jit(lambda model, x: model(x))


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32))


@pytest.fixture(scope="module")
def model():
    return build(disc_config(), 0)


def test_patch_map_sizes(model):
    assert min_input_size(3) == 24 and min_input_size(2) == 12
    out = apply(model, images((2, 32, 32, 3)))
    assert out.shape == (2, 2, 2, 1) and out.dtype == jnp.float32
    assert apply(model, images((1, 24, 40, 3))).shape == (1, 1, 3, 1)
    two_layers = build(disc_config(num_layers=2), 1)
    assert apply(two_layers, images((1, 32, 32, 3))).shape == (1, 6, 6, 1)
    assert [patch_grid_size(s, 3) for s in (24, 32, 40)] == [1, 2, 3]


def test_below_minimum_input_raises(model):
    with pytest.raises(ValueError, match=r"num_layers=3 needs image sides >= 24"):
        model(np.zeros((1, 23, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        model(np.zeros((1, 32, 32, 1), np.float32))


def np_conv(x, kernel, bias, stride):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    oh, ow = (x.shape[1] - 4) // stride + 1, (x.shape[2] - 4) // stride + 1
    out = np.zeros(x.shape[:1] + (oh, ow, kernel.shape[3]))
    for i in range(4):
        for j in range(4):
            out += x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride] @ kernel[i, j]
    return out + (0.0 if bias is None else bias)


def np_leaky(x):
    return np.where(x > 0, x, 0.2 * x)


def test_one_layer_discriminator_matches_numpy_reference():
    model = build(disc_config(num_layers=1, num_groups=2), 2)
    p = {k: np.asarray(v[...], np.float64) for k, v in flat_params(model).items()}
    x = np.asarray(images((2, 8, 10, 3), seed=2), np.float64)
    h = np_leaky(np_conv(x, p["conv_in/kernel"], p["conv_in/bias"], 2))
    h = np_conv(h, p["blocks/0/conv/kernel"], None, 1)
    groups = h.reshape(h.shape[:3] + (2, 8))
    groups = (groups - groups.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
        groups.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
    h = np_leaky(groups.reshape(h.shape) * p["blocks/0/norm/scale"] + p["blocks/0/norm/bias"])
    expected = np_conv(h, p["conv_out/kernel"], p["conv_out/bias"], 1)
    out = apply(model, jnp.asarray(x, jnp.float32))
    assert out.shape == expected.shape == (2, 2, 3, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_logits_of_an_image_do_not_depend_on_its_batch(model):
    batch = images((2, 32, 32, 3), seed=3)
    together = apply(model, batch)
    alone = apply(model, batch[:1])
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(together[0], together[1])


def test_norm_variants_and_biases():
    grouped = {k: v.shape for k, v in flat_params(build(disc_config(), 0)).items()}
    plain = {k: v.shape for k, v in flat_params(build(disc_config(norm="none"), 0)).items()}
    assert {"blocks/0/norm/scale", "blocks/2/norm/bias"} <= set(grouped)
    assert not any("norm" in k for k in plain)
    # A conv followed by GroupNorm has no bias; without a norm every conv has one.
    assert "blocks/0/conv/bias" not in grouped and plain["blocks/0/conv/bias"] == (16,)
    assert grouped["conv_in/bias"] == (8,) and grouped["conv_out/bias"] == (1,)
    assert [grouped[f"blocks/{i}/conv/kernel"] for i in range(3)] == [(4, 4, 8, 16), (4, 4, 16, 32),
                                                                      (4, 4, 32, 64)]
    assert grouped["conv_out/kernel"] == (4, 4, 64, 1)


def test_every_parameter_has_logical_axes(model):
    for name, v in flat_params(model).items():
        axes = v.get_metadata().get("out_sharding")
        if name.endswith("kernel"):
            assert axes == (None, None, "conv_in", "conv_out"), name
        elif "/norm/" in name:
            assert axes == ("norm",), name
        else:
            assert name.endswith("bias") and axes == ("conv_out",), name


def test_initialisation():
    params = {k: np.asarray(v[...]) for k, v in flat_params(
        PatchDiscriminator(disc_config(num_layers=1), rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))).items()}
    assert all(v.dtype == np.float32 for v in params.values())
    np.testing.assert_allclose(params["blocks/0/conv/kernel"].std(), 0.02, rtol=0.1)
    np.testing.assert_array_equal(params["blocks/0/norm/scale"], 1.0)
    np.testing.assert_array_equal(params["conv_out/bias"], 0.0)


@pytest.mark.parametrize("overrides, message", [
    (dict(norm="batch"), "disc.norm='batch'"),
    (dict(num_groups=3), "disc.num_groups=3"),
    (dict(num_layers=0), "disc.num_layers=0"),
    (dict(dtype="float64"), "disc.dtype='float64'"),
])
def test_bad_config_raises_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        PatchDiscriminator(disc_config(**overrides), rngs=nnx.Rngs(0))


def test_missing_field_raises():
    cfg = disc_config()
    del cfg["norm"]
    with pytest.raises(ValueError, match="'norm'"):
        PatchDiscriminator(cfg, rngs=nnx.Rngs(0))
