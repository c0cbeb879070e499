"""`layer_norm_variance="one_pass"`: every LayerNorm of the model takes its variance as mean(x^2) - mean^2, the
logits equal the two-pass model's up to float32 rounding, cached decoding still equals teacher forcing, and the
config names a bad value."""
import numpy as np
import pytest
from flax import nnx

from dalle_jax.models.dalle_bart import validate_config
from tests.models.test_cached_decoding import IMAGE_TOKENS, TEXT, make_cfg, random_model, teacher_forced_and_cached


def layer_norms(model) -> list[nnx.LayerNorm]:
    return [module for _, module in nnx.iter_graph(model) if isinstance(module, nnx.LayerNorm)]


@pytest.mark.parametrize("variance", ["two_pass", "one_pass"])
def test_every_layer_norm_uses_the_configured_variance(variance):
    model = random_model(make_cfg(layer_norm_variance=variance, ffn="mlp", scan_layers=False))
    norms = layer_norms(model)
    # Encoder: embedding and final norms, 1 layer x (2 + the MLP's); decoder: the same two, 2 layers x (4 + 1).
    assert len(norms) == 5 + 12
    assert {norm.use_fast_variance for norm in norms} == {variance == "one_pass"}


def test_one_pass_logits_equal_two_pass_and_cached_decoding_equals_teacher_forcing():
    two_pass, _, _, _ = teacher_forced_and_cached(random_model(make_cfg()), TEXT, IMAGE_TOKENS)
    expected, cached, _, _ = teacher_forced_and_cached(
        random_model(make_cfg(layer_norm_variance="one_pass")), TEXT, IMAGE_TOKENS)
    np.testing.assert_allclose(expected, two_pass, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(cached, expected, atol=1e-4, rtol=1e-4)


def test_config_names_a_bad_variance():
    with pytest.raises(ValueError, match="layer_norm_variance='fast' is unknown"):
        validate_config(make_cfg(layer_norm_variance="fast"))
    validate_config(make_cfg())  # configs written before the field existed mean "two_pass"
    assert not any(norm.use_fast_variance for norm in layer_norms(random_model(make_cfg())))
