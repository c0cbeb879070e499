"""taming-transformers layout: encode/decode of dalle_jax against taming's own modules on weights they wrote,
exact round trips, and errors naming the keys of a wrong file."""
import numpy as np
import pytest
import torch
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2

from dalle_jax.interop import taming_format as fmt, torch_files
from tests.interop.helpers import VQGAN, abstract_params, assert_trees_equal, model_with, perturb_norms, \
    random_params, tiny_vqgan_config, vqgan_encode_decode


class TamingVQModel(torch.nn.Module):
    """taming.models.vqgan.VQModel's generator, with its attribute names and encode/decode steps (VQModel itself
    imports PyTorch Lightning and torchvision, which the test extra does not install)."""

    def __init__(self, cfg):
        super().__init__()
        dd = dict(ch=cfg.ch, out_ch=cfg.out_channels, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                  attn_resolutions=list(cfg.attn_resolutions), dropout=0.0, in_channels=cfg.in_channels,
                  resolution=cfg.resolution, z_channels=cfg.z_channels, double_z=False)
        self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
        self.quantize = VectorQuantizer2(cfg.codebook_size, cfg.embed_dim, beta=0.25, sane_index_shape=True)
        self.quant_conv = torch.nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x):
        z_e = self.quant_conv(self.encoder(x))
        _, _, (_, _, indices) = self.quantize(z_e)
        return z_e, indices

    def decode_code(self, codes):
        z_q = self.quantize.get_codebook_entry(codes.reshape(-1), (*codes.shape, self.quantize.e_dim))
        return self.decoder(self.post_quant_conv(z_q))


def taming_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = TamingVQModel(cfg).eval()
    perturb_norms(model, seed)
    with torch.no_grad():  # taming's codebook init (uniform +-1/n) leaves all codes near 0: spread them out
        model.quantize.embedding.weight.normal_()
    return model


def test_encode_decode_match_taming_modules(tmp_path):
    cfg = tiny_vqgan_config()
    reference = taming_model(cfg)
    path = str(tmp_path / "vqgan.ckpt")
    torch.save({"state_dict": {**reference.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(1)}}, path)

    state, skipped = fmt.generator_state(torch_files.load_tensors(path, what="taming VQGAN"), path=path)
    state = torch_files.to_numpy(state, path=path)
    assert skipped == 1
    inferred = fmt.infer_config(state, resolution=16, path=path)
    assert inferred.to_dict() == cfg.to_dict()
    model = model_with(VQGAN, cfg, fmt.import_params(state, abstract_params(VQGAN, cfg), source=path))

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    codes = rng.integers(0, cfg.codebook_size, (2, 8, 8))
    z_e, indices, decoded = vqgan_encode_decode(model, images, codes)
    with torch.no_grad():
        ref_z, ref_indices = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2))
        ref_decoded = reference.decode_code(torch.from_numpy(codes))
    assert np.abs(z_e - ref_z.permute(0, 2, 3, 1).numpy()).max() <= 1e-4
    np.testing.assert_array_equal(indices, ref_indices.numpy())
    assert np.abs(decoded - ref_decoded.permute(0, 2, 3, 1).numpy()).max() <= 1e-4


def test_round_trips_are_exact():
    cfg = tiny_vqgan_config()
    reference = taming_model(cfg, seed=1)
    state = torch_files.to_numpy(reference.state_dict(), path="ref")
    params = fmt.import_params(state, abstract_params(VQGAN, cfg), source="ref")
    exported = fmt.export_state_dict(params, cfg)
    assert sorted(exported) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(exported[k], state[k], err_msg=k)
    ours = random_params(VQGAN, cfg, seed=2)
    assert_trees_equal(fmt.import_params(fmt.export_state_dict(ours, cfg), abstract_params(VQGAN, cfg), source="x"),
                       ours)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in fmt.export_state_dict(ours, cfg).items()},
                              strict=True)


def test_wrong_layout_is_named():
    cfg = tiny_vqgan_config()
    state = torch_files.to_numpy(taming_model(cfg).state_dict(), path="ref")
    state.pop("decoder.up.1.attn.0.q.weight")
    state["decoder.conv_out.weight"] = np.zeros((3, 32, 1, 1), np.float32)
    with pytest.raises(ValueError) as err:
        fmt.import_params(state, abstract_params(VQGAN, cfg), source="ckpt")
    assert "missing 1 key(s): decoder.up.1.attn.0.q.weight (64, 64, 1, 1)" in str(err.value)
    assert "decoder.conv_out.weight is (3, 32, 1, 1), expected (3, 32, 3, 3)" in str(err.value)


def test_export_refuses_other_group_counts():
    with pytest.raises(ValueError, match="num_groups=8"):
        fmt.export_state_dict({}, tiny_vqgan_config(num_groups=8))
