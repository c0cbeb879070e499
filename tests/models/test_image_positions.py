"""`image_positions="rows_cols"`: a row vector plus a column vector per image position, decoded with the cache
exactly as teacher-forced, exported to min-dalle as the equivalent flat table, and checked in the config."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax.interop import min_dalle_format
from dalle_jax.models.dalle_bart import DalleBart, teacher_forcing_inputs, validate_config
from tests.interop.helpers import dalle_config, model_with, random_params
from tests.models.test_cached_decoding import CODEBOOK, TEXT, make_cfg, random_model, teacher_forced_and_cached

SIDE = 4


def test_each_position_sums_its_row_and_column_vectors():
    model = random_model(make_cfg(image_length=SIDE * SIDE, image_positions="rows_cols"))
    rows = np.asarray(model.decoder.embed_rows.embedding[...])
    cols = np.asarray(model.decoder.embed_cols.embedding[...])
    table = np.asarray(model.decoder.position_embeddings(jnp.arange(SIDE * SIDE)))
    for position in range(SIDE * SIDE):
        np.testing.assert_allclose(table[position], rows[position // SIDE] + cols[position % SIDE], rtol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_cached_steps_equal_teacher_forced_decode(scan):
    model = random_model(make_cfg(image_length=SIDE * SIDE, image_positions="rows_cols", scan_layers=scan))
    tokens = np.random.default_rng(1).integers(0, CODEBOOK, size=(TEXT.shape[0], SIDE * SIDE)).astype(np.int32)
    inputs = np.asarray(teacher_forcing_inputs(jnp.asarray(tokens), CODEBOOK))
    expected, cached, _, _ = teacher_forced_and_cached(model, TEXT, inputs)
    np.testing.assert_allclose(cached, expected, atol=1e-4, rtol=1e-4)


def test_min_dalle_export_holds_the_summed_table_and_gives_the_same_logits():
    cfg = dalle_config(text_vocab_size=64, text_length=16, image_vocab_size=60, image_length=256, d_model=32,
                       encoder_layers=1, decoder_layers=1, heads=4, ffn_dim=48, vocab_multiple=16)
    rows_cols = dalle_config(**{**cfg.to_dict(), "image_positions": "rows_cols"})
    params = random_params(DalleBart, rows_cols, seed=3)
    encoder, decoder = min_dalle_format.export_state_dicts(params, rows_cols)
    table = decoder["embed_positions.weight"]
    rows, cols = (np.asarray(params["decoder"][f"embed_{axis}"]["embedding"]) for axis in ("rows", "cols"))
    np.testing.assert_allclose(table[17], rows[1] + cols[1], rtol=1e-6)
    np.testing.assert_allclose(table[255], rows[15] + cols[15], rtol=1e-6)

    flat_params = min_dalle_format.import_params(encoder, decoder, random_params(DalleBart, cfg, seed=0),
                                                 source="export")
    text = jnp.asarray(np.array([[0, 5, 6, 2, 1, 1]], np.int32))
    image = jnp.asarray(np.random.default_rng(0).integers(0, 60, size=(1, 256)).astype(np.int32))
    inputs = teacher_forcing_inputs(image, 60)
    np.testing.assert_allclose(model_with(DalleBart, cfg, flat_params)(text, inputs),
                               model_with(DalleBart, rows_cols, params)(text, inputs), atol=1e-5, rtol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="image_positions='rows_cols' needs a square"):
        validate_config(make_cfg(image_length=12, image_positions="rows_cols"))
    with pytest.raises(ValueError, match="image_positions='diagonal' is unknown"):
        validate_config(make_cfg(image_positions="diagonal"))
    validate_config(make_cfg())  # configs written before the field existed mean "flat"
    assert "embed_positions" in nnx.state(random_model(make_cfg()).decoder)
