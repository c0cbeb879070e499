"""Sampling: greedy decoding against teacher forcing, guidance, filters, per-image determinism, settings."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax.inference import sampling
from dalle_jax.models.dalle_bart import teacher_forcing_inputs
from dalle_jax.inference.sampling import SamplingSettings
from tests.models.test_cached_decoding import CODEBOOK, IMAGE_LENGTH, make_cfg, random_model

PROMPTS = np.array([[0, 5, 6, 7, 2, 1, 1, 1],
                    [0, 9, 2, 1, 1, 1, 1, 1],
                    [0, 4, 4, 8, 9, 3, 2, 1],
                    [0, 11, 12, 2, 1, 1, 1, 1]], dtype=np.int32)
EMPTY_CAPTION = np.array([0, 2, 1, 1, 1, 1, 1, 1], dtype=np.int32)
STOCHASTIC = SamplingSettings(temperature=1.3, top_k=20, top_p=0.95, cond_scale=2.5)
# One compilation per shape instead of one per eager op.
truncate = jax.jit(sampling.truncate)
top_k_filter = jax.jit(sampling.top_k_filter)
top_p_filter = jax.jit(sampling.top_p_filter)
filter_logits = jax.jit(sampling.filter_logits, static_argnums=1)
draw = jax.jit(sampling.draw)


@pytest.fixture(scope="module")
def split_model():
    return nnx.split(random_model(make_cfg(), seed=3))


def sample(split_model, text_ids, uncond=EMPTY_CAPTION, seeds=0, indices=None, settings=STOCHASTIC, **kw):
    graphdef, state = split_model
    indices = np.arange(len(text_ids)) if indices is None else indices
    out = sampling.sample_image_tokens(graphdef, state, text_ids, uncond, seeds, indices, settings, **kw)
    return np.asarray(out)


@pytest.fixture(scope="module")
def teacher_forced(split_model):
    """f(text_ids, tokens) -> teacher-forced logits (B, L, vocab) of `tokens` given the prompts."""
    graphdef, state = split_model

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(state, text_ids, tokens):
        model = nnx.merge(graphdef, state)
        inputs = teacher_forcing_inputs(tokens, model.start_token)
        return model.decode(inputs, model.encode(text_ids), text_ids)

    return lambda text_ids, tokens: np.asarray(run(state, text_ids, tokens))


@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_top_k_1_is_greedy_on_the_guided_teacher_forced_logits(split_model, teacher_forced, cond_scale):
    settings = SamplingSettings(top_k=1, temperature=0.7, cond_scale=cond_scale)
    tokens = sample(split_model, PROMPTS, settings=settings)
    assert tokens.shape == (4, IMAGE_LENGTH) and tokens.dtype == np.int32

    # Teacher forcing the sampled sequence, with the guidance formula computed here, must make every sampled
    # token the argmax of its position (up to float noise between the cached and the full decoder).
    both = teacher_forced(np.concatenate([PROMPTS, np.tile(EMPTY_CAPTION, (4, 1))]), np.tile(tokens, (2, 1)))
    cond, uncond = both[:4], both[4:]
    guided = uncond + cond_scale * (cond - uncond)
    chosen = np.take_along_axis(guided, tokens[..., None], axis=-1)[..., 0]
    assert np.all(chosen >= guided.max(-1) - 1e-4)
    # The unconditional rows do steer: the greedy images differ from the conditional-only ones.
    if cond_scale != 1.0:
        assert np.any(tokens != guided_free_greedy(split_model))


@pytest.mark.parametrize("cond_scale", [1.0, 2.5])
def test_scores_are_the_conditional_teacher_forced_log_likelihoods(split_model, teacher_forced, cond_scale):
    graphdef, state = split_model
    settings = dataclasses.replace(STOCHASTIC, cond_scale=cond_scale)
    tokens, scores = sampling.sample_image_tokens(graphdef, state, PROMPTS, EMPTY_CAPTION, 0, np.arange(4),
                                                  settings, with_scores=True)
    logits = teacher_forced(PROMPTS, np.asarray(tokens))[..., :CODEBOOK]  # the prompts alone, guided or not
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    expected = np.take_along_axis(log_probs, np.asarray(tokens)[..., None], axis=-1)[..., 0].sum(-1)
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-4, atol=1e-3)


def guided_free_greedy(split_model):
    return sample(split_model, PROMPTS, settings=SamplingSettings(top_k=1, temperature=0.7, cond_scale=1.0))


def test_cond_scale_one_is_conditional_only_sampling(split_model):
    plain = sample(split_model, PROMPTS, uncond=None, settings=dataclasses.replace(STOCHASTIC, cond_scale=1.0))
    # Guidance against unconditional rows equal to the conditional ones leaves the logits exactly as they are,
    # so the guided loop (2B rows) must draw the same tokens as the conditional-only one (B rows).
    guided_by_itself = sample(split_model, PROMPTS, uncond=PROMPTS)
    np.testing.assert_array_equal(plain, guided_by_itself)
    assert np.any(sample(split_model, PROMPTS) != plain)  # a real unconditional prompt changes the images


def test_an_image_depends_only_on_its_prompt_seed_and_index(split_model):
    batch = sample(split_model, PROMPTS, seeds=7, indices=[10, 11, 12, 13])
    alone = sample(split_model, PROMPTS[2:3], seeds=7, indices=[12])
    np.testing.assert_array_equal(alone[0], batch[2])
    assert np.all(batch < CODEBOOK)
    # The same prompt at other indices, or with another seed, gives other images.
    same_prompt = sample(split_model, np.tile(PROMPTS[2], (4, 1)), seeds=7, indices=[12, 13, 14, 15])
    np.testing.assert_array_equal(same_prompt[0], batch[2])
    assert len({row.tobytes() for row in same_prompt}) == 4
    other_seed = sample(split_model, np.tile(PROMPTS[2], (4, 1)), seeds=8, indices=[12, 13, 14, 15])
    assert np.all(np.any(other_seed != same_prompt, axis=1))


# ---- filters ----

def test_top_k_filter_keeps_the_k_largest():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 50)), jnp.float32)
    for k in (1, 7, 50, 80):
        kept = np.isfinite(np.asarray(top_k_filter(logits, k)))
        assert np.all(kept.sum(-1) == min(k, 50))
        threshold = np.sort(np.asarray(logits), axis=-1)[:, -min(k, 50)][:, None]
        np.testing.assert_array_equal(kept, np.asarray(logits) >= threshold)
    tied = jnp.array([[3.0, 1.0, 3.0, 2.0]])
    assert np.isfinite(np.asarray(top_k_filter(tied, 1))).tolist() == [[True, False, True, False]]


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 40)).astype(np.float32) * 2
    for p in (0.01, 0.3, 0.75, 0.999):
        kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p)))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for row, row_probs in zip(kept, probs):
            order = np.argsort(-row_probs)
            needed = int(np.searchsorted(np.cumsum(row_probs[order]), p) + 1)  # smallest count reaching p
            assert set(np.flatnonzero(row)) == set(order[:needed]), p
    # Two equal tokens carry all the mass: the first alone reaches p = 0.4, and its tie is kept with it.
    two = jnp.array([[0.0, -jnp.inf, 0.0, -jnp.inf]])
    assert np.isfinite(np.asarray(top_p_filter(two, 0.4))).tolist() == [[True, False, True, False]]


def test_top_p_applies_to_what_top_k_kept():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    # Among all three, 0.6 needs two tokens; renormalised over the top 2 (0.625, 0.375), the first suffices.
    assert np.isfinite(np.asarray(truncate(logits, 3, 0.6))).tolist() == [[True, True, False]]
    assert np.isfinite(np.asarray(truncate(logits, 2, 0.6))).tolist() == [[True, False, False]]
    assert np.isfinite(np.asarray(truncate(logits, 2, 1.0))).tolist() == [[True, True, False]]


def test_a_model_with_row_products_prepared_once_samples_the_same(split_model):
    prepared = sampling.with_row_products(*split_model)
    kernel = lambda state: state["decoder"]["layers"]["ffn"]["fc0"]["kernel"][...]
    assert kernel(prepared[1]).shape == np.swapaxes(kernel(split_model[1]), -1, -2).shape != kernel(split_model[1]).shape
    np.testing.assert_array_equal(sample(prepared, PROMPTS), sample(split_model, PROMPTS))


def test_an_unrolled_copy_samples_the_same(split_model):
    cfg = make_cfg()
    assert cfg.scan_layers
    params = nnx.state(nnx.merge(*split_model), nnx.Param).to_pure_dict()
    unrolled = sampling.unrolled_model(cfg, params)
    assert not unrolled.decoder.scan_layers and len(unrolled.decoder.layers) == cfg.decoder_layers
    np.testing.assert_array_equal(sample(nnx.split(unrolled), PROMPTS), sample(split_model, PROMPTS))


def test_a_static_top_k_partial_sort_equals_the_full_sort():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 96)) * 3, jnp.float32)
    for k, p in ((1, 1.0), (5, 1.0), (5, 0.5), (40, 0.9), (96, 0.3), (500, 0.95)):
        static = jax.jit(functools.partial(sampling.truncate, top_k=k))(logits, top_p=p)
        np.testing.assert_array_equal(np.asarray(static), np.asarray(truncate(logits, k, p)), err_msg=str((k, p)))


def test_the_samplers_top_k_draw_has_the_truncated_distribution():
    # 20,000 draws from one row of distinct logits: drawn in the (B, k) space, each id comes up as often as its
    # probability after truncate(), and nothing truncate() removes is ever drawn.
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(1, 64)) * 2, jnp.float32)
    keys = jax.random.split(jax.random.key(1), 20_000)
    rows = jnp.tile(logits, (20_000, 1))
    for k, p in ((1, None), (6, None), (6, 0.6), (64, 0.9), (100, None)):
        drawn = np.asarray(jax.jit(sampling.draw_top_k, static_argnums=2)(keys, rows, k, p))
        truncated = np.asarray(truncate(logits, k, 1.0 if p is None else p))[0]
        expected = np.exp(truncated - truncated.max())
        expected /= expected.sum()
        frequencies = np.bincount(drawn, minlength=64) / len(drawn)
        assert np.all(frequencies[expected == 0] == 0), (k, p)
        np.testing.assert_allclose(frequencies, expected, atol=0.012, err_msg=str((k, p)))


def test_temperature_and_codebook_restriction():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 64)), jnp.float32)
    out = np.asarray(filter_logits(logits, CODEBOOK, 2.0))
    np.testing.assert_allclose(out[:, :CODEBOOK], np.asarray(logits)[:, :CODEBOOK] / 2.0, rtol=1e-6)
    assert np.all(out[:, CODEBOOK:] == -np.inf)


def test_ids_outside_the_codebook_are_never_drawn():
    # Padded columns far above the codebook ones, and a temperature that flattens everything: still never drawn.
    logits = jnp.concatenate([jnp.zeros((1000, CODEBOOK)), jnp.full((1000, 32), 1e4)], axis=1)
    keys = jax.random.split(jax.random.key(0), 1000)
    for temperature, truncation in ((1e8, None), (1.0, (40, 1.0)), (1.0, (64, 1.0)), (1e8, (64, 0.99))):
        filtered = filter_logits(logits, CODEBOOK, temperature)
        drawn = np.asarray(draw(keys, filtered if truncation is None else truncate(filtered, *truncation)))
        assert drawn.max() < CODEBOOK and len(set(drawn.tolist())) > CODEBOOK // 2
        if truncation is not None:  # the sampler's own path: top-k in the (B, k) space
            drawn = np.asarray(jax.jit(sampling.draw_top_k, static_argnums=2)(keys, filtered, *truncation))
            assert drawn.max() < CODEBOOK and len(set(drawn.tolist())) > CODEBOOK // 2


def test_guide_formula():
    cond, uncond = jnp.array([[2.0, -1.0]]), jnp.array([[1.0, 1.0]])
    np.testing.assert_allclose(sampling.guide(cond, uncond, 3.0), [[4.0, -5.0]])
    np.testing.assert_allclose(sampling.guide(cond, uncond, 1.0), cond)


# ---- settings and inputs ----

@pytest.mark.parametrize("overrides, message", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"candidates": 0}, "candidates"),
    ({"candidates": 2.0}, "candidates"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, r"top_p.*\(0, 1\]"),
    ({"top_p": 1.5}, r"top_p.*\(0, 1\]"),
    ({"cond_scale": -1.0}, "cond_scale"),
    ({"cond_scale": float("nan")}, "cond_scale"),
])
def test_bad_settings_are_rejected(overrides, message):
    settings = SamplingSettings(**overrides)
    with pytest.raises(ValueError, match=message):
        settings.validate()


def test_good_settings_pass():
    for settings in (SamplingSettings(), SamplingSettings(top_k=1, top_p=1.0, temperature=0.1, cond_scale=1.0)):
        settings.validate()


def test_bad_inputs_are_rejected(split_model):
    with pytest.raises(ValueError, match="top_k"):
        sample(split_model, PROMPTS, settings=SamplingSettings(top_k=0))
    with pytest.raises(ValueError, match="uncond_text_ids"):
        sample(split_model, PROMPTS, uncond=None)
    with pytest.raises(ValueError, match="uncond_text_ids"):
        sample(split_model, PROMPTS, uncond=np.tile(EMPTY_CAPTION, (3, 1)))
    with pytest.raises(ValueError, match="seeds"):
        sample(split_model, PROMPTS, seeds=[1, 2])
    with pytest.raises(ValueError, match="indices"):
        sample(split_model, PROMPTS, indices=[-1, 0, 1, 2])
    with pytest.raises(ValueError, match="text_ids"):
        sample(split_model, PROMPTS.astype(np.float32))


def test_given_overrides_are_checked_alone_and_top_k_zero_means_no_filter():
    assert SamplingSettings.overrides(temperature=None, top_k=0, cond_scale=1.5) == dict(top_k=0, cond_scale=1.5)
    with pytest.raises(ValueError, match="top_k=-1 must be an integer >= 1"):
        SamplingSettings.overrides(top_k=-1)
    with pytest.raises(ValueError, match="temperature=0"):
        SamplingSettings.overrides(temperature=0.0)
