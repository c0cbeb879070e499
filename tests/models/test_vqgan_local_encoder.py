"""`local_encoder=True`: every code is a function of its own patch's pixels, and formats whose encoder is taming's
refuse such a model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax.interop import diffusers_format, taming_format
from dalle_jax.models.vqgan import VQGAN
from tests.models.test_vqgan import images, randomize, tiny_config


@pytest.fixture(scope="module")
def local_model():
    return randomize(nnx.eval_shape(lambda: VQGAN(tiny_config(local_encoder=True), rngs=nnx.Rngs(0))), seed=3)


def test_changing_one_patch_changes_only_its_code(local_model):
    x = images(batch=1)
    y = x.at[0, 8:10, 0:2].set(0.5)  # patch (4, 0) of the 8x8 grid of 2x2 patches
    changed = np.array(jnp.abs(local_model.encoder(y) - local_model.encoder(x)).max(axis=-1)[0])
    assert changed[4, 0] > 1e-3
    changed[4, 0] = 0
    np.testing.assert_array_equal(changed, 0.0)


def test_a_patch_gets_the_same_code_wherever_it_is(local_model):
    patch = images(batch=1, side=8, seed=5)
    background = jnp.full((1, 16, 16, 3), 0.9)
    at_top_left = background.at[:, 0:8, 0:8].set(patch)
    at_bottom_right = background.at[:, 8:16, 8:16].set(patch)
    _, codes_a, _ = local_model.encode(at_top_left)
    _, codes_b, _ = local_model.encode(at_bottom_right)
    np.testing.assert_array_equal(codes_a[0, :4, :4], codes_b[0, 4:, 4:])
    np.testing.assert_array_equal(codes_a[0, 4:, 4:], codes_b[0, :4, :4])  # the background too


def test_the_standard_encoder_is_not_local():
    model = randomize(nnx.eval_shape(lambda: VQGAN(tiny_config(), rngs=nnx.Rngs(0))), seed=3)
    x = images(batch=1)
    changed = jnp.abs(model.encoder(x.at[0, 8:10, 0:2].set(0.5)) - model.encoder(x)).max(axis=-1)[0]
    assert (np.asarray(changed) > 0).all()


def test_gradients_flow_through_the_patch_encoder(local_model):
    graphdef, params = nnx.split(local_model)

    def loss(p):
        x_rec, aux = nnx.merge(graphdef, p)(images())
        return jnp.mean(jnp.abs(x_rec)) + aux["commitment_loss"]

    grads = jax.jit(jax.grad(loss))(params)  # one program, not one per op
    assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"].value).max()) > 0


@pytest.mark.parametrize("check", [taming_format.check_exportable, diffusers_format.check_exportable])
def test_taming_shaped_formats_refuse_a_local_encoder(check):
    with pytest.raises(ValueError, match="local_encoder=True"):
        check(tiny_config(local_encoder=True))
