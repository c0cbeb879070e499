"""The canonical safetensors export: per-layer names whatever the layer layout, exact round trips, and a file of
the wrong layout refused with its keys named."""
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dalle_jax.interop import safetensors_format as fmt
from tests.interop.helpers import DalleBart, abstract_params, assert_trees_equal, dalle_config, random_params

FIELDS = dict(text_vocab_size=64, text_length=16, image_vocab_size=32, image_length=16, d_model=32,
              encoder_layers=2, decoder_layers=2, heads=4, ffn_dim=48, vocab_multiple=16)


def run(model_cfg):
    return ml_collections.ConfigDict(dict(model=model_cfg))


def test_files_do_not_depend_on_layer_scanning(tmp_path):
    scanned = dalle_config(**FIELDS, scan_layers=True)
    listed = dalle_config(**FIELDS, scan_layers=False)
    params = random_params(DalleBart, scanned, seed=0)
    fmt.export(str(tmp_path / "a"), "seq2seq", run(scanned), params)
    as_list = fmt.import_params(str(tmp_path / "a"), abstract_params(DalleBart, listed))
    assert as_list["encoder"]["layers"][1]["ffn"]["fc0"]["kernel"].shape == (32, 48)
    np.testing.assert_array_equal(as_list["decoder"]["layers"][1]["encoder_attn"]["q_proj"]["kernel"],
                                  params["decoder"]["layers"]["encoder_attn"]["q_proj"]["kernel"][1])
    fmt.export(str(tmp_path / "b"), "seq2seq", run(listed), as_list)
    a, b = load_file(str(tmp_path / "a" / fmt.WEIGHTS_FILE)), load_file(str(tmp_path / "b" / fmt.WEIGHTS_FILE))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert_trees_equal(fmt.import_params(str(tmp_path / "b"), abstract_params(DalleBart, scanned)), params)


def test_wrong_layout_is_named(tmp_path):
    cfg = dalle_config(**FIELDS)
    fmt.export(str(tmp_path), "seq2seq", run(cfg), random_params(DalleBart, cfg, seed=1))
    tensors = load_file(str(tmp_path / fmt.WEIGHTS_FILE))
    del tensors["decoder.layers.1.ffn.ln1.scale"]
    tensors["decoder.lm_head.kernel"] = tensors["decoder.lm_head.kernel"][:, :40].copy()
    save_file(tensors, str(tmp_path / fmt.WEIGHTS_FILE))
    with pytest.raises(ValueError) as err:
        fmt.import_params(str(tmp_path), abstract_params(DalleBart, cfg))
    assert "missing 1 key(s): decoder.layers.1.ffn.ln1.scale (48,)" in str(err.value)
    assert "decoder.lm_head.kernel is (32, 40), expected (32, 48)" in str(err.value)
