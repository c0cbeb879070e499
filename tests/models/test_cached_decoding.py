"""Cached one-token decoding gives DalleBart's teacher-forced logits, for scanned and unrolled stacks."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dalle_jax.models import cached_decoding
from dalle_jax.models.dalle_bart import MASKED_LOGIT, DalleBart, teacher_forcing_inputs

# Tiny programs: LLVM's optimisations would cost more compile time than they save at run time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

CODEBOOK = 32
IMAGE_LENGTH = 12
TEXT = np.array([[0, 5, 6, 7, 2, 1, 1, 1],
                 [0, 9, 2, 1, 1, 1, 1, 1],
                 [0, 4, 4, 8, 9, 3, 2, 1]], dtype=np.int32)
IMAGE_TOKENS = np.random.default_rng(0).integers(0, CODEBOOK, size=(3, IMAGE_LENGTH)).astype(np.int32)


def make_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        text_vocab_size=40, text_length=8, image_vocab_size=CODEBOOK, image_length=IMAGE_LENGTH, d_model=32,
        encoder_layers=1, decoder_layers=2, heads=4, ffn_dim=48, ffn="glu", dropout=0.0, dtype="float32",
        param_dtype="float32", scan_layers=True, remat="none", vocab_multiple=64, image_positions="flat",
        layer_norm_variance="two_pass"))
    cfg.update(overrides)
    return cfg


def random_model(cfg, seed: int = 0) -> DalleBart:
    """A model of `cfg` with every parameter random (norm scales and biases too, so that they matter), filled in
    from the abstract model: running the initializers eagerly would compile one op per parameter shape."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DalleBart(cfg, rngs=nnx.Rngs(params=0, dropout=1))))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(seed), x.shape) if x.shape else jax.random.key(seed)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return np.zeros(x.shape, x.dtype)
        mean = 1.0 if path[-1].key == "scale" else 0.0
        return rng.normal(mean, 0.3, x.shape).astype(x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, state.to_pure_dict()))
    return nnx.merge(graphdef, state)


def teacher_forced_and_cached(model: DalleBart, text, image_inputs, row_products: bool = False):
    """Teacher-forced logits, and the same positions decoded one token at a time, (B, L, vocab) each, plus the
    final cache; with `row_products` the steps use transposed kernels (`cached_decoding.use_row_products`)."""
    graphdef, state = nnx.split(model)

    @jit
    def run(state, text, image_inputs):
        m = nnx.merge(graphdef, state)
        expected = m.decode(image_inputs, m.encode(text), text)
        cross_kv, cross_mask = cached_decoding.encode_prompt(m, text)
        cache = cached_decoding.init_cache(m, text.shape[0], cross_kv.dtype)
        if row_products:
            cached_decoding.use_row_products(m)
        step_graphdef, step_state = nnx.split(m)

        def step(cache, position):
            step_model = nnx.merge(step_graphdef, step_state, copy=True)
            logits, cache = cached_decoding.decode_step(
                step_model, image_inputs[:, position], position, cache, cross_kv, cross_mask)
            return cache, logits

        cache, logits = jax.lax.scan(step, cache, jnp.arange(image_inputs.shape[1]))
        stacked = lambda kv: cached_decoding.KeyValues(*(jnp.stack(x) if isinstance(x, tuple) else x for x in kv))
        return expected, jnp.swapaxes(logits, 0, 1), stacked(cross_kv), stacked(cache)

    return jax.tree.map(np.asarray, run(state, text, image_inputs))


@pytest.mark.parametrize("scan, ffn, row_products", [(True, "glu", False), (False, "glu", False), (True, "mlp", False),
                                                     (False, "mlp", False), (True, "glu", True), (False, "mlp", True)])
def test_cached_steps_equal_teacher_forced_decode(scan, ffn, row_products):
    model = random_model(make_cfg(scan_layers=scan, ffn=ffn))
    inputs = np.asarray(teacher_forcing_inputs(jnp.asarray(IMAGE_TOKENS), CODEBOOK))
    expected, cached, cross_kv, cache = teacher_forced_and_cached(model, TEXT, inputs, row_products)

    assert cached.shape == expected.shape == (3, IMAGE_LENGTH, 64) and cached.dtype == np.float32
    np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5)
    assert np.all(cached[..., CODEBOOK:] == MASKED_LOGIT)
    # Layer-major, heads first: (layers, batch, heads, length, head_dim); every position of the cache was written.
    assert cross_kv.keys.shape == (2, 3, 4, 8, 8) and cache.keys.shape == (2, 3, 4, IMAGE_LENGTH, 8)
    assert np.all(np.abs(cache.values).max(axis=(2, 4)) > 0)


def test_decode_step_rejects_mismatched_batches():
    model = nnx.eval_shape(lambda: DalleBart(make_cfg(), rngs=nnx.Rngs(params=0, dropout=1)))
    kv = lambda rows, length: cached_decoding.KeyValues(*[np.zeros((2, rows, 4, length, 8), np.float32)] * 2)
    mask = np.ones((3, 1, 1, 8), bool)
    with pytest.raises(ValueError, match="token_ids"):
        cached_decoding.decode_step(model, np.zeros((2,), np.int32), 0, kv(3, IMAGE_LENGTH), kv(3, 8), mask)
    with pytest.raises(ValueError, match="cross_kv"):
        cached_decoding.decode_step(model, np.zeros((2,), np.int32), 0, kv(2, IMAGE_LENGTH), kv(3, 8), mask)


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_row_products_equal_the_dot_one_row_at_a_time_and_together(rows):
    rng = np.random.default_rng(rows)
    x, kernel = rng.normal(size=(rows, 1, 24)).astype(np.float32), rng.normal(size=(24, 40)).astype(np.float32)
    product = jit(lambda x, kernel_t: cached_decoding._rows_times_transposed(x, kernel_t))(x, kernel.T.copy())
    assert product.shape == (rows, 1, 40)
    np.testing.assert_allclose(product, x @ kernel, rtol=1e-5, atol=1e-5)
