"""taming-transformers' VQGAN state dict <-> dalle_jax VQGAN parameters, both directions.

Our VQGAN keeps taming's module names, so the mapping renames only the leaf kinds (`kernel` -> `weight` with the
conv layout (kh, kw, in, out) <-> (out, in, kh, kw), GroupNorm `scale` -> `weight`, the codebook
`quantize.embedding` -> `quantize.embedding.weight`). A Lightning checkpoint's `state_dict` also holds the
training loss (discriminator and LPIPS under `loss.`); those are not part of the image tokenizer and are skipped.
"""
from __future__ import annotations

import re
from typing import Mapping

import ml_collections
import numpy as np

from dalle_jax.interop import names

TAMING_NUM_GROUPS = 32  # taming's Normalize() is GroupNorm(32 groups, eps 1e-6)
LOSS_PREFIX = "loss."
CODEBOOK = "quantize.embedding"


def to_torch_name(name: str) -> str:
    if name == CODEBOOK:
        return CODEBOOK + ".weight"
    if name.endswith(".kernel") or name.endswith(".scale"):
        return name.rsplit(".", 1)[0] + ".weight"
    return name


def to_torch_array(name: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if name.endswith(".kernel"):
        return np.transpose(value, (3, 2, 0, 1))
    return value


def torch_shape(name: str, shape: tuple) -> tuple:
    """The shape `to_torch_array` gives an array of our `shape`."""
    return (shape[3], shape[2], shape[0], shape[1]) if name.endswith(".kernel") else tuple(shape)


def from_torch_array(name: str, value: np.ndarray) -> np.ndarray:
    """Inverse of `to_torch_array`, keyed by our name."""
    if name.endswith(".kernel"):
        return np.transpose(value, (2, 3, 1, 0))
    return value


def check_standard_encoder(model_cfg: ml_collections.ConfigDict, fmt: str) -> None:
    if model_cfg.get("local_encoder", False):
        raise ValueError(f"The VQGAN was trained with local_encoder=True (each patch encoded on its own); "
                         f"{fmt}'s encoder has GroupNorm and attention, so it cannot hold these weights. Export it "
                         "to safetensors, or to min-dalle, whose detokenizer is the decoder alone.")


def check_exportable(model_cfg: ml_collections.ConfigDict, fmt: str = "taming") -> None:
    check_standard_encoder(model_cfg, fmt)
    if model_cfg.num_groups != TAMING_NUM_GROUPS:
        raise ValueError(f"The VQGAN has num_groups={model_cfg.num_groups}, but {fmt}'s modules use GroupNorm with "
                         f"{TAMING_NUM_GROUPS} groups; only a model trained with num_groups={TAMING_NUM_GROUPS} "
                         "exports to this format.")
    if model_cfg.l2_normalize_codes:
        raise ValueError(f"The VQGAN uses l2_normalize_codes=True (cosine-distance codes), which {fmt}'s "
                         "quantizer does not have; it cannot be exported to this format.")


def export_state_dict(params, model_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """VQGAN parameters (pure dict) -> taming's VQModel state dict (numpy, f32)."""
    check_exportable(model_cfg)
    return {to_torch_name(k): to_torch_array(k, v) for k, v in names.flatten(params).items()}


def import_params(state: Mapping[str, np.ndarray], template, *, source: str) -> dict:
    """taming state dict (numpy) -> VQGAN parameters shaped like `template` (a pure dict or its abstract version).
    Raises naming every missing, unexpected or mis-shaped key."""
    ours = names.shapes(template)
    by_torch = {to_torch_name(k): k for k in ours}
    expected = {to_torch_name(k): torch_shape(k, s) for k, s in ours.items()}
    names.check_names_and_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, source=source)
    flat = {by_torch[k]: from_torch_array(by_torch[k], np.asarray(v, np.float32)) for k, v in state.items()}
    return names.unflatten_like(flat, template, source=source)


def generator_state(state: Mapping, *, path: str) -> tuple[Mapping, int]:
    """The image tokenizer's entries of a taming file: a Lightning checkpoint's `state_dict` or a bare state dict,
    without the training loss's `loss.*` entries; returns them and how many loss entries were skipped."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    kept = {k: v for k, v in state.items() if not k.startswith(LOSS_PREFIX)}
    return kept, len(state) - len(kept)


def infer_config(state: Mapping[str, np.ndarray], *, resolution: int, path: str) -> ml_collections.ConfigDict:
    """Our VQGAN model config for a taming state dict (numpy, torch layout); `resolution` is the image side the
    model was trained for (taming files do not record it), which places `attn_resolutions`."""
    def shape(key):
        if key not in state:
            raise ValueError(f"{path!r} has no {key!r}: it is not a taming VQGAN state dict "
                             f"(its first keys: {sorted(state)[:5]}).")
        return state[key].shape

    ch = shape("encoder.conv_in.weight")[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"{path!r}: the encoder levels {levels} are not 0..n-1.")
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    num_res_blocks = len({m.group(1) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    attn_resolutions = tuple(resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state)
    codebook_size, embed_dim = shape("quantize.embedding.weight")
    return ml_collections.ConfigDict(dict(
        resolution=int(resolution), in_channels=int(shape("encoder.conv_in.weight")[1]),
        out_channels=int(shape("decoder.conv_out.weight")[0]), ch=int(ch), ch_mult=ch_mult,
        num_res_blocks=int(num_res_blocks), attn_resolutions=attn_resolutions,
        z_channels=int(shape("encoder.conv_out.weight")[0]), embed_dim=int(embed_dim),
        codebook_size=int(codebook_size), beta=0.25, l2_normalize_codes=False, num_groups=TAMING_NUM_GROUPS,
        dropout=0.0, dtype="float32", local_encoder=False))
