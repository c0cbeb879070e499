"""min-dalle's state dicts (`encoder.pt`, `decoder.pt`, `detoker.pt`) <-> dalle_jax parameters, both directions.

DalleBart: our module names are min-dalle's except the feed-forward (`ffn` here, `glu` there); linear kernels are
transposed ((in, out) <-> (out, in)) and LayerNorm `scale` is torch's `weight`. min-dalle's decoder has one table
size for its input embedding and its output head (`image_vocab_count + 1` rows each) and always 256 positions, so
an export pads our `image_vocab_size + 1` embedding rows with zeros up to the head's padded width (whose extra
columns our model masks anyway). A `dalle_jax.json` written beside the files records our sizes, so re-importing an
export gives back exactly the model that was exported; without it, sizes are read from the tables.

Detokenizer: min-dalle's `VQGanDetokenizer` is the decoder half of DALL·E mini's f16 VQGAN (codebook,
post_quant_conv, decoder) in taming's names. It returns images in [0, 1] where our VQGAN works in [-1, 1], so the
last conv is rescaled on the way in (x -> 2x - 1) and back on the way out.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import ml_collections
import numpy as np

from dalle_jax.interop import names, taming_format

ENCODER_FILE, DECODER_FILE, DETOKER_FILE = "encoder.pt", "decoder.pt", "detoker.pt"
SIDECAR_FILE = "dalle_jax.json"
IMAGE_TOKEN_COUNT = 256  # min-dalle's decoder has exactly this many positions
HEAD_DIM = 64  # DALL·E mini and mega both use 64-wide heads (16 x 64 = 1024, 32 x 64 = 2048)
DETOKER_PARTS = ("quantize.", "post_quant_conv.", "decoder.")
# The detokenizer's sizes are fixed in min-dalle's code: DALL·E mini's VQGAN (f16, 16384 codes of 256 dims).
DETOKER_VQGAN = dict(resolution=256, in_channels=3, out_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4),
                     num_res_blocks=2, attn_resolutions=(16,), z_channels=256, embed_dim=256, codebook_size=16384,
                     beta=0.25, l2_normalize_codes=False, num_groups=32, dropout=0.0, dtype="float32",
                     local_encoder=False)


# ---- DalleBart ---------------------------------------------------------------------------------------------------

def _torch_name(name: str) -> str:
    name = name.split(".", 1)[1].replace(".ffn.", ".glu.")
    for ours in (".kernel", ".scale", ".embedding"):
        if name.endswith(ours):
            return name[: -len(ours)] + ".weight"
    return name


def _to_torch(name: str, value) -> np.ndarray:
    value = np.asarray(value, np.float32)
    return value.T if name.endswith(".kernel") else value


def check_exportable(model_cfg: ml_collections.ConfigDict) -> None:
    if model_cfg.ffn != "glu":
        raise ValueError(f"The model has ffn={model_cfg.ffn!r}; min-dalle's layers have DALL·E mini's GLU "
                         "feed-forward, so only ffn='glu' models export to min-dalle.")
    if model_cfg.image_length != IMAGE_TOKEN_COUNT:
        raise ValueError(f"The model has image_length={model_cfg.image_length}; min-dalle's decoder has exactly "
                         f"{IMAGE_TOKEN_COUNT} image positions (a 16x16 grid).")


def export_state_dicts(params, model_cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """DalleBart parameters (pure dict) -> (encoder, decoder) state dicts of numpy f32 arrays."""
    check_exportable(model_cfg)
    flat = names.flatten(params)
    if "decoder.embed_rows.embedding" in flat:  # rows_cols positions: min-dalle holds their sums, one per position
        rows, cols = (np.asarray(flat.pop(f"decoder.embed_{axis}.embedding"), np.float32) for axis in ("rows", "cols"))
        flat["decoder.embed_positions.embedding"] = (rows[:, None] + cols[None, :]).reshape(-1, rows.shape[1])
    encoder = {_torch_name(k): _to_torch(k, v) for k, v in flat.items() if k.startswith("encoder.")}
    decoder = {_torch_name(k): _to_torch(k, v) for k, v in flat.items() if k.startswith("decoder.")}
    head_rows = decoder["lm_head.weight"].shape[0]
    table = decoder["embed_tokens.weight"]
    decoder["embed_tokens.weight"] = np.concatenate(
        [table, np.zeros((head_rows - table.shape[0], table.shape[1]), np.float32)])
    return encoder, decoder


def sidecar(model_cfg: ml_collections.ConfigDict) -> dict:
    """Our sizes that min-dalle's files cannot carry, written beside an export."""
    return dict(image_vocab_size=int(model_cfg.image_vocab_size), vocab_multiple=int(model_cfg.vocab_multiple),
                heads=int(model_cfg.heads))


def read_sidecar(directory: str) -> dict | None:
    path = os.path.join(directory, SIDECAR_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _largest_power_of_two_dividing(n: int) -> int:
    return n & -n


def infer_model_config(encoder: Mapping[str, np.ndarray], decoder: Mapping[str, np.ndarray], *,
                       heads: int | None, extra: dict | None, source: str) -> dict:
    """DalleBart model fields read from min-dalle state dicts (numpy, torch layout)."""
    def shape(state, key, which):
        if key not in state:
            raise ValueError(f"{source}: {which} has no {key!r}; it is not a min-dalle {which} state dict "
                             f"(its first keys: {sorted(state)[:5]}).")
        return state[key].shape

    def layer_count(state):
        return len({k.split(".")[1] for k in state if k.startswith("layers.")})

    text_vocab, d_model = shape(encoder, "embed_tokens.weight", ENCODER_FILE)
    text_length = shape(encoder, "embed_positions.weight", ENCODER_FILE)[0]
    ffn_dim = shape(encoder, "layers.0.glu.fc0.weight", ENCODER_FILE)[0]
    table_rows = shape(decoder, "embed_tokens.weight", DECODER_FILE)[0]
    head_rows = shape(decoder, "lm_head.weight", DECODER_FILE)[0]
    image_length = shape(decoder, "embed_positions.weight", DECODER_FILE)[0]
    if extra:
        image_vocab_size, vocab_multiple = int(extra["image_vocab_size"]), int(extra["vocab_multiple"])
        heads = heads or int(extra["heads"])
    else:
        # min-dalle's image_vocab_count: its table has one more row (the start token), as ours does.
        image_vocab_size, vocab_multiple = table_rows - 1, _largest_power_of_two_dividing(head_rows)
    heads = heads or max(1, d_model // HEAD_DIM)
    return dict(text_vocab_size=int(text_vocab), text_length=int(text_length), image_vocab_size=image_vocab_size,
                image_length=int(image_length), d_model=int(d_model), encoder_layers=layer_count(encoder),
                decoder_layers=layer_count(decoder), heads=int(heads), ffn_dim=int(ffn_dim), ffn="glu",
                vocab_multiple=vocab_multiple)


def import_params(encoder: Mapping[str, np.ndarray], decoder: Mapping[str, np.ndarray], template, *,
                  source: str) -> dict:
    """min-dalle (encoder, decoder) state dicts -> DalleBart parameters shaped like `template`. The decoder's table
    may have more rows than ours (min-dalle pads it to the head's width); only rows past our table are dropped."""
    ours = names.shapes(template)
    flat = {}
    for part, state, file in (("encoder", encoder, ENCODER_FILE), ("decoder", decoder, DECODER_FILE)):
        keys = {_torch_name(k): k for k in ours if k.startswith(part + ".")}
        expected = {t: tuple(ours[k][::-1]) if k.endswith(".kernel") else tuple(ours[k]) for t, k in keys.items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if part == "decoder" and "embed_tokens.weight" in found:
            rows, width = found["embed_tokens.weight"]
            if rows >= expected["embed_tokens.weight"][0] and width == expected["embed_tokens.weight"][1]:
                found["embed_tokens.weight"] = expected["embed_tokens.weight"]
        names.check_names_and_shapes(found, expected, source=f"{source}/{file}")
        for t, k in keys.items():
            value = np.asarray(state[t], np.float32)
            if t == "embed_tokens.weight":
                value = value[: ours[k][0]]
            flat[k] = _to_torch(k, value)  # a transpose is its own inverse
    return names.unflatten_like(flat, template, source=source)


# ---- Detokenizer (VQGAN decoder) ---------------------------------------------------------------------------------

def detoker_vqgan_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(DETOKER_VQGAN))


def _is_detoker_part(name: str) -> bool:
    return name.startswith(DETOKER_PARTS)


def _detoker_name(ours: str) -> str:
    return "embedding.weight" if ours == taming_format.CODEBOOK else taming_format.to_torch_name(ours)


def export_detoker(params, model_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """VQGAN parameters -> min-dalle detokenizer state dict; the VQGAN must have DALL·E mini's VQGAN sizes."""
    expected = detoker_vqgan_config()
    differ = {k: (model_cfg[k], v) for k, v in expected.items()
              if k not in ("resolution", "dropout", "dtype", "beta") and tuple(np.atleast_1d(model_cfg[k])) !=
              tuple(np.atleast_1d(v))}
    if differ:
        raise ValueError("min-dalle's detokenizer has fixed sizes; this VQGAN differs in "
                         + ", ".join(f"{k}={a!r} (needs {b!r})" for k, (a, b) in differ.items()) + ".")
    state = {_detoker_name(k): taming_format.to_torch_array(k, v)
             for k, v in names.flatten(params).items() if _is_detoker_part(k)}
    # Our images are in [-1, 1], min-dalle's in [0, 1]: y01 = (y + 1) / 2.
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"] / 2
    state["decoder.conv_out.bias"] = ((state["decoder.conv_out.bias"].astype(np.float64) + 1) / 2).astype(np.float32)
    return state


def import_detoker(state: Mapping[str, np.ndarray], template, *, source: str) -> dict:
    """min-dalle detokenizer state dict -> VQGAN parameters shaped like `template`. The encoder half (and
    quant_conv) is not in the file: it is filled with NaN, so that encoding with it can never pass unnoticed."""
    ours = names.shapes(template)
    decode_keys = {_detoker_name(k): k for k in ours if _is_detoker_part(k)}
    expected = {t: taming_format.torch_shape(k, ours[k]) for t, k in decode_keys.items()}
    names.check_names_and_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, source=source)
    flat = {k: np.full(s, np.nan, np.float32) for k, s in ours.items() if not _is_detoker_part(k)}
    for t, k in decode_keys.items():
        value = np.asarray(state[t], np.float32)
        if t == "decoder.conv_out.weight":
            value = value * 2
        elif t == "decoder.conv_out.bias":
            value = (value.astype(np.float64) * 2 - 1).astype(np.float32)
        flat[k] = taming_format.from_torch_array(k, value)
    return names.unflatten_like(flat, template, source=source)
