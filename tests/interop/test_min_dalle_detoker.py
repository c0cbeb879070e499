"""min-dalle's detokenizer (DALL·E mini's VQGAN decoder, sizes fixed in its code): strict loading both ways, the
[0, 1] <-> [-1, 1] output rescale and the code lookup against min-dalle's own modules, exact round trips.

The decoder body uses taming's names and the taming mapping, which test_taming_format checks numerically; running
the full-size decoder here would take far longer than the rest of these tests together."""
import numpy as np
import pytest
import torch
from min_dalle.models import VQGanDetokenizer

from dalle_jax.interop import min_dalle_format as fmt
from tests.interop.helpers import VQGAN, abstract_params, model_with


@pytest.fixture(scope="module")
def detoker_state():
    """A full-size detokenizer state dict: small random tensors (cheap to draw) for every entry."""
    with torch.device("meta"):
        module = VQGanDetokenizer()
    rng = np.random.default_rng(0)
    return {k: ((rng.random(v.shape, np.float32) - 0.5) * 0.1 + (1.0 if k.endswith("norm_out.weight") else 0.0))
            for k, v in module.state_dict().items()}


def meta_detoker(state):
    with torch.device("meta"):
        module = VQGanDetokenizer()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
    return module.eval()


def test_import_round_trip_and_output_range(detoker_state):
    cfg = fmt.detoker_vqgan_config()
    params = fmt.import_detoker(detoker_state, abstract_params(VQGAN, cfg), source="detoker.pt")
    assert np.isnan(params["encoder"]["conv_in"]["kernel"]).all()  # no encoder in the file: never silently zero
    exported = fmt.export_detoker(params, cfg)
    reference = meta_detoker(exported)  # loads with strict=True
    assert sorted(exported) == sorted(detoker_state)
    for k, v in detoker_state.items():
        if k == "decoder.conv_out.bias":  # (2b - 1 + 1) / 2 in float64 then f32: within one f32 step of 1.0
            np.testing.assert_allclose(exported[k], v, rtol=0, atol=6e-8)
        else:
            np.testing.assert_array_equal(exported[k], v, err_msg=k)

    # The last stage (norm_out, swish, conv_out) and the code lookup + post_quant_conv, against min-dalle's modules.
    model = model_with(VQGAN, cfg, params)
    rng = np.random.default_rng(1)
    features = rng.standard_normal((1, 128, 6, 6)).astype(np.float32)
    codes = rng.integers(0, 16384, (1, 3, 3))
    dec = reference.decoder
    with torch.no_grad():
        dec.norm_out.eps = 1e-6  # min-dalle's GroupNorm keeps torch's 1e-5; taming (and dalle_jax) use 1e-6
        h = dec.norm_out(torch.from_numpy(features))
        ref_images = dec.conv_out(h * torch.sigmoid(h)).permute(0, 2, 3, 1).numpy()
        ref_z = reference.post_quant_conv(reference.embedding(torch.from_numpy(codes)).permute(0, 3, 1, 2))
    ours_h = model.decoder.norm_out(features.transpose(0, 2, 3, 1))
    ours_images = np.asarray(model.decoder.conv_out(ours_h * (1 / (1 + np.exp(-np.asarray(ours_h))))))
    np.testing.assert_allclose((ours_images + 1) / 2, ref_images, atol=1e-5, rtol=0)
    ours_z = np.asarray(model.post_quant_conv(model.quantize.codes(codes)))
    np.testing.assert_allclose(ours_z, ref_z.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def test_wrong_files_are_refused(detoker_state):
    cfg = fmt.detoker_vqgan_config()
    state = dict(detoker_state)
    state.pop("post_quant_conv.bias")
    state["encoder.conv_in.weight"] = np.zeros((128, 3, 3, 3), np.float32)
    with pytest.raises(ValueError) as err:
        fmt.import_detoker(state, abstract_params(VQGAN, cfg), source="detoker.pt")
    assert "missing 1 key(s): post_quant_conv.bias (256,)" in str(err.value)
    assert "unexpected 1 key(s): encoder.conv_in.weight (128, 3, 3, 3)" in str(err.value)
    small = fmt.detoker_vqgan_config()
    small.ch = 64
    with pytest.raises(ValueError, match="ch=64 \\(needs 128\\)"):
        fmt.export_detoker({}, small)
