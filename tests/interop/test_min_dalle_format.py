"""min-dalle layout: logits of dalle_jax against min-dalle's own modules on weights they wrote, exact round trips
both ways, strict loading into min-dalle's modules, and errors that name the keys of a wrong file."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from min_dalle.models import DalleBartDecoder, DalleBartEncoder

from dalle_jax.interop import min_dalle_format as fmt, torch_files
from tests.interop.helpers import DalleBart, abstract_params, assert_trees_equal, dalle_config, model_with, \
    perturb_norms, random_params

SIZES = dict(layers=2, d_model=32, heads=4, ffn=48, text_vocab=64, text_length=16, image_vocab=60)


def min_dalle_modules(seed=0):
    torch.manual_seed(seed)
    s = SIZES
    encoder = DalleBartEncoder(layer_count=s["layers"], embed_count=s["d_model"], attention_head_count=s["heads"],
                               text_vocab_count=s["text_vocab"], text_token_count=s["text_length"],
                               glu_embed_count=s["ffn"], device="cpu").eval()
    decoder = DalleBartDecoder(image_vocab_count=s["image_vocab"], embed_count=s["d_model"],
                               attention_head_count=s["heads"], glu_embed_count=s["ffn"], layer_count=s["layers"],
                               device="cpu").eval()
    perturb_norms(encoder, seed + 1)
    perturb_norms(decoder, seed + 2)
    return encoder, decoder


def write_min_dalle(directory, encoder, decoder):
    os.makedirs(directory, exist_ok=True)
    torch.save(encoder.state_dict(), os.path.join(directory, fmt.ENCODER_FILE))
    torch.save(decoder.state_dict(), os.path.join(directory, fmt.DECODER_FILE))


def read_min_dalle(directory, scan_layers=True):
    enc = torch_files.load_state_dict(os.path.join(directory, fmt.ENCODER_FILE), what="encoder")
    dec = torch_files.load_state_dict(os.path.join(directory, fmt.DECODER_FILE), what="decoder")
    fields = fmt.infer_model_config(enc, dec, heads=SIZES["heads"], extra=fmt.read_sidecar(directory),
                                    source=directory)
    cfg = dalle_config(**fields, scan_layers=scan_layers)
    return cfg, fmt.import_params(enc, dec, abstract_params(DalleBart, cfg), source=directory)


def test_logits_match_min_dalle_modules(tmp_path):
    encoder, decoder = min_dalle_modules()
    write_min_dalle(tmp_path, encoder, decoder)
    cfg, params = read_min_dalle(tmp_path)
    assert (cfg.image_vocab_size, cfg.text_length, cfg.image_length) == (60, 16, 256)
    model = model_with(DalleBart, cfg, params)

    rng = np.random.default_rng(0)
    text = np.ones((2, SIZES["text_length"]), np.int64)  # min-dalle's encoder takes exactly 2 rows of full length
    text[0, :5] = [0, 7, 9, 11, 2]
    text[1, :9] = [0, *rng.integers(4, SIZES["text_vocab"], 7), 2]
    image_inputs = np.concatenate([[SIZES["image_vocab"]], rng.integers(0, SIZES["image_vocab"], 23)])[None]
    with torch.no_grad():
        torch_states = encoder(torch.from_numpy(text))
        torch_logits, _ = decoder(attention_mask=torch.from_numpy(text != 1)[:, None, None, :],
                                  encoder_state=torch_states, attention_state=torch.zeros(2, 4, 256, 32),
                                  prev_tokens=torch.from_numpy(image_inputs), token_index=torch.arange(24))
    states, logits = nnx.jit(lambda m, t, i: (m.encode(t), m(t, i)))(
        model, jnp.asarray(text, jnp.int32), jnp.asarray(np.repeat(image_inputs, 2, 0), jnp.int32))
    np.testing.assert_allclose(np.asarray(states), torch_states.numpy(), atol=1e-4, rtol=0)
    diff = np.abs(np.asarray(logits)[..., :60] - torch_logits.numpy()[..., :60]).max()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("scan_layers", [True, False])
def test_min_dalle_files_round_trip_exactly(tmp_path, scan_layers):
    encoder, decoder = min_dalle_modules(seed=3)
    write_min_dalle(tmp_path / "src", encoder, decoder)
    cfg, params = read_min_dalle(tmp_path / "src", scan_layers=scan_layers)
    enc, dec = fmt.export_state_dicts(params, cfg)
    for state, module in ((enc, encoder), (dec, decoder)):
        reference = module.state_dict()
        assert sorted(state) == sorted(reference)
        for k, v in state.items():
            np.testing.assert_array_equal(v, reference[k].numpy(), err_msg=k)


def test_export_loads_strictly_into_min_dalle_and_reimports_exactly(tmp_path):
    encoder_layers = 2
    cfg = dalle_config(text_vocab_size=64, text_length=16, image_vocab_size=60, image_length=256, d_model=32,
                       encoder_layers=encoder_layers, decoder_layers=2, heads=4, ffn_dim=48, vocab_multiple=16)
    params = random_params(DalleBart, cfg, seed=5)
    enc, dec = fmt.export_state_dicts(params, cfg)
    torch_files.save_state_dict(enc, str(tmp_path / fmt.ENCODER_FILE))
    torch_files.save_state_dict(dec, str(tmp_path / fmt.DECODER_FILE))
    import json
    (tmp_path / fmt.SIDECAR_FILE).write_text(json.dumps(fmt.sidecar(cfg)))

    s = SIZES
    encoder = DalleBartEncoder(layer_count=encoder_layers, embed_count=32, attention_head_count=4,
                               text_vocab_count=64, text_token_count=16, glu_embed_count=48, device="cpu")
    decoder = DalleBartDecoder(image_vocab_count=63, embed_count=32, attention_head_count=4, glu_embed_count=48,
                               layer_count=2, device="cpu")  # the head padded to 64 = vocab_multiple
    encoder.load_state_dict(torch.load(tmp_path / fmt.ENCODER_FILE, weights_only=True), strict=True)
    decoder.load_state_dict(torch.load(tmp_path / fmt.DECODER_FILE, weights_only=True), strict=True)
    assert s["heads"] == 4

    back_cfg, back = read_min_dalle(tmp_path)
    assert (back_cfg.image_vocab_size, back_cfg.vocab_multiple, back_cfg.encoder_layers) == (60, 16, encoder_layers)
    assert_trees_equal(back, params)


def test_wrong_layout_names_missing_unexpected_and_shapes(tmp_path):
    encoder, decoder = min_dalle_modules()
    state = encoder.state_dict()
    state.pop("layers.1.glu.fc2.weight")
    state["layers.0.mlp.weight"] = torch.zeros(3)
    state["final_ln.weight"] = torch.zeros(31)
    enc = torch_files.to_numpy(state, path="encoder.pt")
    dec = torch_files.to_numpy(decoder.state_dict(), path="decoder.pt")
    cfg = dalle_config(**fmt.infer_model_config(enc, torch_files.to_numpy(decoder.state_dict(), path="d"),
                                                heads=4, extra=None, source="src"))
    with pytest.raises(ValueError) as err:
        fmt.import_params(enc, dec, abstract_params(DalleBart, cfg), source="src")
    message = str(err.value)
    assert "layers.1.glu.fc2.weight (32, 48)" in message and "missing 1" in message
    assert "layers.0.mlp.weight (3,)" in message and "unexpected 1" in message
    assert "final_ln.weight is (31,), expected (32,)" in message


def test_non_tensor_file_is_refused(tmp_path):
    path = tmp_path / "encoder.pt"
    torch.save({"embed_tokens.weight": torch.zeros(2, 2), "hook": object()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        torch_files.load_state_dict(str(path), what="encoder")
