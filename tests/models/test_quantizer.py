"""Vector quantizer: nearest-code lookup, straight-through gradients, loss placement, codebook statistics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dalle_jax  # noqa: F401  (sets the flax config the project relies on)
from dalle_jax.models.quantizer import (VectorQuantizer, code_counts, codebook_perplexity, codebook_usage,
                                        nearest_code, restart_dead_codes)

# Hand-worked example: nearest codes of z are [0, 1, 2, 1]; z - code = [[.1,.2],[-.1,.3],[.5,.4],[2,2]], whose
# squares sum to 8.56 over 8 elements -> mean 1.07.
CODEBOOK = np.array([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]], np.float32)
Z = np.array([[0.1, 0.2], [0.9, 1.3], [-1.5, 0.4], [3.0, 3.0]], np.float32)
BETA = 0.25


def make_quantizer(codebook, *, beta=BETA, l2_normalize=False):
    # Built abstractly (no initializer to compile): the codebook is set right after.
    q = nnx.eval_shape(lambda: VectorQuantizer(codebook.shape[0], codebook.shape[1], beta=beta,
                                               l2_normalize=l2_normalize, rngs=nnx.Rngs(0)))
    q.embedding.set_value(jnp.asarray(codebook))
    return q


@nnx.jit
def quantize(q, z):
    return q(z)


@nnx.jit(static_argnames="loss_name")
def grads_of(q, z, loss_name):
    """Gradients of one aux loss w.r.t. (codebook, z)."""
    def loss(q, z):
        return q(z)[2][loss_name]

    g_q, g_z = nnx.grad(loss, argnums=(0, 1))(q, z)
    return g_q.embedding[...], g_z


def test_hand_computed_losses_and_indices():
    z_q, indices, aux = quantize(make_quantizer(CODEBOOK), jnp.asarray(Z))
    np.testing.assert_array_equal(indices, [0, 1, 2, 1])
    assert indices.dtype == jnp.int32
    np.testing.assert_allclose(z_q, CODEBOOK[[0, 1, 2, 1]], atol=1e-6)
    np.testing.assert_allclose(aux["codebook_loss"], 1.07, rtol=1e-5)
    np.testing.assert_allclose(aux["commitment_loss"], BETA * 1.07, rtol=1e-5)
    np.testing.assert_allclose(aux["z_e"], Z)


def test_codebook_loss_moves_only_the_codebook():
    g_codebook, g_z = grads_of(make_quantizer(CODEBOOK), jnp.asarray(Z), "codebook_loss")
    # d/dE_k mean((z - E_idx)^2) = sum over rows using code k of 2 (E_k - z_i) / 8.
    expected = np.array([[-0.025, -0.05], [-0.475, -0.575], [-0.125, -0.1]], np.float32)
    np.testing.assert_allclose(g_codebook, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_z, 0.0)


def test_commitment_loss_moves_only_the_encoder_with_factor_beta():
    g_codebook, g_z = grads_of(make_quantizer(CODEBOOK), jnp.asarray(Z), "commitment_loss")
    # beta * 2 (z - E_idx) / 8 = 0.0625 * (z - E_idx).
    expected = 0.0625 * np.array([[0.1, 0.2], [-0.1, 0.3], [0.5, 0.4], [2.0, 2.0]], np.float32)
    np.testing.assert_allclose(g_z, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_codebook, 0.0)
    g_codebook, g_z = grads_of(make_quantizer(CODEBOOK, beta=1.0), jnp.asarray(Z), "commitment_loss")
    np.testing.assert_allclose(g_z, expected / BETA, rtol=1e-5, atol=1e-7)


def test_straight_through_gradient_equals_gradient_at_codes():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(16, 4)).astype(np.float32)
    z = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    weights = jnp.asarray(rng.normal(size=z.shape).astype(np.float32))
    q = make_quantizer(codebook)

    def downstream(u):
        return jnp.sum(jnp.sin(u) * weights)

    @nnx.jit
    def both_gradients(q, z):
        z_q = q(z)[0]
        return jax.grad(lambda z: downstream(q(z)[0]))(z), jax.grad(downstream)(z_q)

    grad_through_quantizer, grad_at_codes = both_gradients(q, jnp.asarray(z))
    np.testing.assert_allclose(grad_through_quantizer, grad_at_codes, rtol=1e-5, atol=1e-6)
    assert np.abs(grad_through_quantizer).min() > 0


def test_nearest_code_matches_brute_force_argmin():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, 8)).astype(np.float32)
    codebook = rng.normal(size=(64, 8)).astype(np.float32)
    brute = np.argmin(((z[:, None, :].astype(np.float64) - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(jax.jit(nearest_code)(jnp.asarray(z), jnp.asarray(codebook)), brute)
    _, indices, _ = quantize(make_quantizer(codebook), jnp.asarray(z.reshape(3, 10, 10, 8)))
    np.testing.assert_array_equal(indices.reshape(-1), brute)


def test_nearest_code_never_forms_an_n_by_k_by_d_tensor():
    n, k, d = 50, 40, 8
    jaxpr = jax.make_jaxpr(nearest_code)(jnp.zeros((n, d)), jnp.zeros((k, d)))
    sizes = [math.prod(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert max(sizes) < n * k * d


def test_l2_normalized_mode_uses_cosine_similarity():
    rng = np.random.default_rng(2)
    codebook = rng.normal(size=(32, 6)).astype(np.float32) * rng.uniform(0.1, 5, size=(32, 1)).astype(np.float32)
    z = rng.normal(size=(2, 5, 5, 6)).astype(np.float32)
    q = make_quantizer(codebook, l2_normalize=True)
    z_q, indices, aux = quantize(q, jnp.asarray(z))

    unit_codes = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
    unit_z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    np.testing.assert_array_equal(indices, np.argmax(unit_z @ unit_codes.T, axis=-1))
    np.testing.assert_allclose(np.linalg.norm(z_q, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(aux["z_e"], unit_z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["codebook_loss"], np.mean((unit_z - unit_codes[indices]) ** 2), rtol=1e-4)
    np.testing.assert_allclose(nnx.jit(lambda q, i: q.codes(i))(q, indices), unit_codes[indices], rtol=1e-5,
                               atol=1e-6)
    # Cosine lookup ignores the scale of the encoder output.
    _, scaled_indices, _ = quantize(q, jnp.asarray(3.7 * z))
    np.testing.assert_array_equal(scaled_indices, indices)


def test_usage_and_perplexity_on_known_indices():
    @jax.jit
    def stats(indices):
        return codebook_usage(indices, 16), codebook_perplexity(indices, 16), code_counts(indices, 16)

    usage, perplexity, _ = stats(jnp.array([[0, 5, 9, 12]] * 6, jnp.int32))  # uniform over 4 codes
    np.testing.assert_allclose(usage, 4 / 16)
    np.testing.assert_allclose(perplexity, 4.0, rtol=1e-6)
    usage, perplexity, _ = stats(jnp.full((6, 4), 7, jnp.int32))  # a single code
    np.testing.assert_allclose(usage, 1 / 16)
    np.testing.assert_allclose(perplexity, 1.0, rtol=1e-6)
    usage, perplexity, counts = stats(jnp.array([[2, 2, 2, 3]] * 6, jnp.int32))  # frequencies 3/4, 1/4
    np.testing.assert_allclose(usage, 2 / 16)
    np.testing.assert_allclose(perplexity, math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rtol=1e-6)
    np.testing.assert_array_equal(counts[:5], [0, 0, 18, 6, 0])


def test_restart_replaces_exactly_the_dead_codes():
    rng = np.random.default_rng(3)
    codebook = rng.normal(size=(6, 3)).astype(np.float32)
    usage = jnp.array([5.0, 0.01, 3.0, 0.0, 2.0, 0.02])
    dead = np.array([False, True, False, True, False, True])
    restart = jax.jit(restart_dead_codes)

    z_e = rng.normal(size=(10, 3)).astype(np.float32)
    new = np.asarray(restart(jnp.asarray(codebook), usage, jnp.asarray(z_e), jax.random.key(0), 0.5))
    np.testing.assert_array_equal(new[~dead], codebook[~dead])
    matches = [np.flatnonzero(np.all(z_e == row, axis=1)) for row in new[dead]]
    assert all(len(m) == 1 for m in matches), "every dead code must become one of the encoder outputs"
    assert len({int(m[0]) for m in matches}) == dead.sum(), "replacements are distinct when N >= K"

    few = rng.normal(size=(2, 3)).astype(np.float32)  # fewer encoder outputs than codes
    new = np.asarray(restart(jnp.asarray(codebook), usage, jnp.asarray(few), jax.random.key(1), 0.5))
    np.testing.assert_array_equal(new[~dead], codebook[~dead])
    assert all(np.any(np.all(few == row, axis=1)) for row in new[dead])

    untouched = restart(jnp.asarray(codebook), usage, jnp.asarray(z_e), jax.random.key(0), 0.0)
    np.testing.assert_array_equal(untouched, codebook)


def test_bad_inputs_raise():
    q = make_quantizer(CODEBOOK)
    with pytest.raises(ValueError, match="embed_dim=2"):
        q(np.zeros((4, 3), np.float32))
    with pytest.raises(TypeError, match="integers"):
        q.codes(np.zeros((2,), np.float32))
    with pytest.raises(ValueError, match="beta"):
        VectorQuantizer(4, 2, beta=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="same D"):
        restart_dead_codes(np.zeros((4, 2)), np.zeros((4,)), np.zeros((5, 3)), None, 1.0)
    with pytest.raises(ValueError, match="one count per code"):
        restart_dead_codes(np.zeros((4, 2)), np.zeros((3,)), np.zeros((5, 2)), None, 1.0)


def test_codebook_has_logical_axes():
    q = make_quantizer(CODEBOOK)
    assert q.embedding.get_metadata()["out_sharding"] == ("codebook", "code")
