"""`config.model.code_features`: codes described by where and in which colour they draw, measured from images; the
decoder embeds from and scores with those rows, decodes with the cache exactly as teacher-forced, never trains them,
and equals the plain layout it is sampled and exported in."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.shapes import code_features
from dalle_jax.shapes.code_features_bart import CodeFeaturesBart
from dalle_jax.models.dalle_bart import DalleBart, teacher_forcing_inputs
from dalle_jax.training import optimizers
from tests.interop.helpers import model_with, random_params
from tests.models.test_cached_decoding import CODEBOOK, IMAGE_TOKENS, TEXT, make_cfg, teacher_forced_and_cached

RED, GREEN, BACKGROUND = (220, 40, 40), (40, 160, 60), (240, 240, 240)
PALETTE = np.array([RED, GREEN])
WIDTH = code_features.palette_width(len(PALETTE))


def two_images():
    """Two 8x8 images of 2x2 patches (4x4 pixels each), with their codes: 0 background, 1 all red, 2 green in the
    left half, 3 red in image 0 and green in image 1 (so its colour is half red, half green); code 4 never occurs."""
    images = np.full((2, 8, 8, 3), BACKGROUND, np.uint8)
    images[:, 0:4, 4:8] = RED
    images[:, 4:8, 0:2] = GREEN
    images[0, 4:8, 4:8] = (200, 50, 30)  # nearest to red
    images[1, 4:8, 4:8] = GREEN
    codes = np.array([[[0, 1], [2, 3]]] * 2, np.int32)
    return images, codes


def test_features_measure_where_and_in_which_colour_each_code_draws():
    images, codes = two_images()
    features = code_features.palette_code_features(images, codes, 5, PALETTE, BACKGROUND)
    assert features.shape == (6, WIDTH)
    mask, colour, flags = features[:, :16], features[:, 16:18], features[:, 18:]
    np.testing.assert_array_equal(mask[0], 0)
    np.testing.assert_array_equal(mask[1], 1)
    np.testing.assert_array_equal(mask[2].reshape(4, 4), [[1, 1, 0, 0]] * 4)  # green in the left two columns
    np.testing.assert_array_equal(mask[3], 1)
    np.testing.assert_allclose(colour[:4], [[0, 0], [1, 0], [0, 0.5], [0.5, 0.5]])  # shares of the whole patch
    np.testing.assert_array_equal(flags[:, 0], [0, 0, 0, 0, 1, 0])  # unseen: code 4 only
    np.testing.assert_array_equal(flags[:, 1], [0, 0, 0, 0, 0, 1])  # the start token's row
    np.testing.assert_array_equal(flags[:, 2], 1)
    np.testing.assert_array_equal(features[4, :18], 0)


def test_features_sample_larger_and_smaller_patches_on_a_4x4_grid():
    images, codes = two_images()
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 8x8-pixel patches
    np.testing.assert_array_equal(code_features.palette_code_features(big, codes, 5, PALETTE, BACKGROUND),
                                  code_features.palette_code_features(images, codes, 5, PALETTE, BACKGROUND))
    small = images[:, ::2, ::2]  # 2x2-pixel patches: each pixel stands for a 2x2 block of the mask
    mask = code_features.palette_code_features(small, codes, 5, PALETTE, BACKGROUND)[2, :16].reshape(4, 4)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0]] * 4)


def test_bad_images_or_codes_are_refused():
    images, codes = two_images()
    with pytest.raises(ValueError, match="codes hold ids outside"):
        code_features.palette_code_features(images, codes, 3, PALETTE, BACKGROUND)
    with pytest.raises(ValueError, match="g dividing the image side"):
        code_features.palette_code_features(images, np.zeros((2, 3, 3), np.int32), 5, PALETTE, BACKGROUND)
    with pytest.raises(ValueError, match=r"images must be \(N, S, S, 3\)"):
        code_features.palette_code_features(images[..., 0], codes, 5, PALETTE, BACKGROUND)
    with pytest.raises(ValueError, match="code_features=-1 must be 0"):
        CodeFeaturesBart.validate_config(make_cfg(code_features=-1))


def featured_cfg(**overrides):
    return make_cfg(code_features=WIDTH, **overrides)


@pytest.mark.parametrize("scan", [True, False])
def test_cached_steps_equal_teacher_forced_decode(scan):
    cfg = featured_cfg(scan_layers=scan)
    model = model_with(CodeFeaturesBart, cfg, random_params(CodeFeaturesBart, cfg, seed=2))
    inputs = np.asarray(teacher_forcing_inputs(jnp.asarray(IMAGE_TOKENS), CODEBOOK))
    expected, cached, _, _ = teacher_forced_and_cached(model, TEXT, inputs)
    np.testing.assert_allclose(cached, expected, atol=1e-4, rtol=1e-4)
    _, row_cached, _, _ = teacher_forced_and_cached(model, TEXT, inputs, row_products=True)
    np.testing.assert_allclose(row_cached, expected, atol=1e-4, rtol=1e-4)


def test_dense_equivalent_computes_the_same_logits():
    cfg = featured_cfg()
    params = random_params(CodeFeaturesBart, cfg, seed=4)
    dense_cfg, dense_params = CodeFeaturesBart.dense_equivalent(cfg, params)
    assert "code_features" not in dense_cfg and cfg.code_features == WIDTH
    assert "code_features" not in dense_params["decoder"]
    assert dense_params["decoder"]["embed_tokens"]["embedding"].shape == (CODEBOOK + 1, cfg.d_model)
    inputs = teacher_forcing_inputs(jnp.asarray(IMAGE_TOKENS), CODEBOOK)
    featured = model_with(CodeFeaturesBart, cfg, params)(jnp.asarray(TEXT), inputs)
    dense = model_with(DalleBart, dense_cfg, jax.tree.map(np.asarray, dense_params))(jnp.asarray(TEXT), inputs)
    np.testing.assert_allclose(dense, featured, atol=1e-4, rtol=1e-4)
    plain_cfg = make_cfg(code_features=0)
    again_cfg, again_params = CodeFeaturesBart.dense_equivalent(plain_cfg, dense_params)
    assert again_cfg.to_dict() == dense_cfg.to_dict() and again_params is dense_params


def test_features_get_no_gradient_and_no_weight_decay():
    cfg = featured_cfg()
    params = jax.tree.map(jnp.asarray, random_params(CodeFeaturesBart, cfg, seed=5))
    inputs = teacher_forcing_inputs(jnp.asarray(IMAGE_TOKENS), CODEBOOK)

    def loss(p):
        return jnp.mean(model_with(CodeFeaturesBart, cfg, p)(jnp.asarray(TEXT), inputs) ** 2)

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["decoder"]["code_features"]).max()) == 0.0
    assert float(jnp.abs(grads["decoder"]["embed_features"]["kernel"]).max()) > 0.0
    assert float(jnp.abs(grads["decoder"]["head_features"]["kernel"]).max()) > 0.0

    opt_cfg = optimizers_config()
    tx = optimizers.make_optimizer(opt_cfg, total_steps=10)
    state = tx.init(params)
    for _ in range(3):  # past the warmup's zero learning rate
        updates, state = tx.update(grads, state, params)
    np.testing.assert_array_equal(updates["decoder"]["code_features"], 0.0)
    assert float(jnp.abs(updates["decoder"]["lm_head"]["kernel"]).max()) > 0.0


def optimizers_config():
    from dalle_jax.configs import seq2seq_common
    opt_cfg = seq2seq_common.base_config().optimizer
    opt_cfg.weight_decay = 0.1  # decay would shrink the table if the mask let it
    opt_cfg.warmup_steps = 1
    return opt_cfg
