"""dalle_jax VQGAN -> a diffusers `VQModel` folder (`config.json` + `diffusion_pytorch_model.safetensors`).

diffusers names the same network differently: levels are `down_blocks` / `up_blocks` (the decoder's listed from
the lowest resolution up, the reverse of taming's `up`), residual blocks `resnets`, the shortcut `conv_shortcut`,
and attention is `group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0` with linear (out, in) weights where ours are
1x1 convs. The folder is written with `safetensors` alone; diffusers is needed only to load it.
"""
from __future__ import annotations

import json
import os
import re

import ml_collections
import numpy as np
from safetensors.numpy import save_file

from dalle_jax.interop import names, taming_format

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}


def check_exportable(model_cfg: ml_collections.ConfigDict) -> None:
    taming_format.check_standard_encoder(model_cfg, fmt="diffusers")
    if model_cfg.ch_mult[0] != 1:
        raise ValueError(f"ch_mult={tuple(model_cfg.ch_mult)}: diffusers' VQModel feeds conv_in's channels straight "
                         "into the first level, so the first multiplier must be 1.")
    if model_cfg.l2_normalize_codes:
        raise ValueError("The VQGAN uses l2_normalize_codes=True, which diffusers' quantizer does not have.")


def _has_attention(model_cfg, level: int) -> bool:
    return model_cfg.resolution // 2 ** level in tuple(model_cfg.attn_resolutions)


def diffusers_config(model_cfg: ml_collections.ConfigDict) -> dict:
    levels = len(model_cfg.ch_mult)
    down = ["AttnDownEncoderBlock2D" if _has_attention(model_cfg, i) else "DownEncoderBlock2D" for i in range(levels)]
    up = ["AttnUpDecoderBlock2D" if _has_attention(model_cfg, i) else "UpDecoderBlock2D"
          for i in reversed(range(levels))]
    return {
        "_class_name": "VQModel",
        "in_channels": int(model_cfg.in_channels), "out_channels": int(model_cfg.out_channels),
        "down_block_types": down, "up_block_types": up,
        "block_out_channels": [int(model_cfg.ch * m) for m in model_cfg.ch_mult],
        "layers_per_block": int(model_cfg.num_res_blocks), "act_fn": "silu",
        "latent_channels": int(model_cfg.z_channels), "sample_size": int(model_cfg.resolution),
        "num_vq_embeddings": int(model_cfg.codebook_size), "norm_num_groups": int(model_cfg.num_groups),
        "vq_embed_dim": int(model_cfg.embed_dim), "scaling_factor": 1.0, "norm_type": "group",
        "mid_block_add_attention": True, "lookup_from_codebook": False, "force_upcast": False,
    }


def diffusers_name(name: str, num_levels: int) -> str:
    """Our flat VQGAN name -> diffusers' (the kind suffix renamed as taming's, then the module path)."""
    name = taming_format.to_torch_name(name)
    if m := re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(\w+)$", name):
        part, kind, level, sub, index, module, leaf = m.groups()
        level = int(level) if kind == "down" else num_levels - 1 - int(level)
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        if sub == "block":
            return f"{part}.{blocks}.{level}.resnets.{index}.{_resnet(module)}.{leaf}"
        return f"{part}.{blocks}.{level}.attentions.{index}.{_ATTENTION[module]}.{leaf}"
    if m := re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(\w+)$", name):
        part, kind, level, sampler, leaf = m.groups()
        level = int(level) if kind == "down" else num_levels - 1 - int(level)
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        return f"{part}.{blocks}.{level}.{sampler}rs.0.conv.{leaf}"
    if m := re.match(r"(encoder|decoder)\.mid\.(\w+)\.(\w+)\.(\w+)$", name):
        part, block, module, leaf = m.groups()
        module = _ATTENTION[module] if block == "attn_1" else _resnet(module)
        return f"{part}.mid_block.{_MID[block]}.{module}.{leaf}"
    return name.replace(".norm_out.", ".conv_norm_out.")


def _resnet(module: str) -> str:
    return "conv_shortcut" if module == "nin_shortcut" else module


def _array(ours: str, torch_name: str, value) -> np.ndarray:
    value = taming_format.to_torch_array(ours, value)
    if ".attentions." in torch_name and value.ndim == 4:
        return value[:, :, 0, 0]  # a 1x1 conv is a linear layer
    return value


def export_state_dict(params, model_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    check_exportable(model_cfg)
    levels = len(model_cfg.ch_mult)
    out = {}
    for ours, value in names.flatten(params).items():
        torch_name = diffusers_name(ours, levels)
        out[torch_name] = np.ascontiguousarray(_array(ours, torch_name, value), np.float32)
    return out


def write_folder(params, model_cfg: ml_collections.ConfigDict, out_dir: str, *, dtype=np.float32) -> None:
    """Writes a folder `diffusers.VQModel.from_pretrained(out_dir)` loads."""
    state = {k: v.astype(dtype) for k, v in export_state_dict(params, model_cfg).items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(diffusers_config(model_cfg), f, indent=2, sort_keys=True)
