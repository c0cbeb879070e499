"""diffusers export: the folder loads with `diffusers.VQModel.from_pretrained` and encodes/decodes as dalle_jax does."""
import numpy as np
import pytest
import torch
from diffusers import VQModel

from dalle_jax.interop import diffusers_format
from tests.interop.helpers import VQGAN, model_with, random_params, tiny_vqgan_config, vqgan_encode_decode


def test_exported_folder_matches_diffusers_vqmodel(tmp_path):
    cfg = tiny_vqgan_config()
    params = random_params(VQGAN, cfg, seed=4)
    diffusers_format.write_folder(params, cfg, str(tmp_path / "vqmodel"))
    reference = VQModel.from_pretrained(str(tmp_path / "vqmodel")).eval()  # raises on missing/unexpected weights
    assert sorted(reference.state_dict()) == sorted(diffusers_format.export_state_dict(params, cfg))

    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    codes = rng.integers(0, cfg.codebook_size, (2, 8, 8))
    z_e, indices, decoded = vqgan_encode_decode(model_with(VQGAN, cfg, params), images, codes)
    with torch.no_grad():
        latents = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latents
        _, _, (_, _, ref_indices) = reference.quantize(latents)
        z_q = reference.quantize.get_codebook_entry(torch.from_numpy(codes).reshape(-1), (2, 8, 8, cfg.embed_dim))
        ref_decoded = reference.decode(z_q, force_not_quantize=True).sample
    assert np.abs(z_e - latents.permute(0, 2, 3, 1).numpy()).max() <= 1e-4
    np.testing.assert_array_equal(indices.reshape(-1), ref_indices.numpy().reshape(-1))
    assert np.abs(decoded - ref_decoded.permute(0, 2, 3, 1).numpy()).max() <= 1e-4


def test_export_refuses_what_diffusers_cannot_hold():
    with pytest.raises(ValueError, match="first multiplier must be 1"):
        diffusers_format.export_state_dict({}, tiny_vqgan_config(ch_mult=(2, 2)))
