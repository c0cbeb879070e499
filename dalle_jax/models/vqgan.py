"""The VQGAN image tokenizer: taming-transformers' encoder / vector quantizer / decoder in Flax NNX.

Module names follow taming's (encoder/down/0/block/1/conv1/kernel <-> encoder.down.0.block.1.conv1.weight), so
weights move between the two with a name mapping and a kernel transpose. Images enter as float NHWC in [-1, 1];
parameters are float32 and `cfg.dtype` is the compute dtype; the quantizer and its losses always run in float32.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle_jax.models.conv_layers import (PAD_1, AttnBlock, Downsample, ResnetBlock, Upsample,
                                          as_dropout_rngs, check_num_groups, compute_dtype, conv, group_norm,
                                          norm_layer)
from dalle_jax.models.quantizer import VectorQuantizer

CONFIG_FIELDS = ("resolution", "in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks",
                 "attn_resolutions", "z_channels", "embed_dim", "codebook_size", "beta", "l2_normalize_codes",
                 "num_groups", "dropout", "dtype", "local_encoder")


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises on a VQGAN config the model cannot be built from, naming the field and the fix."""
    missing = [f for f in CONFIG_FIELDS if f not in cfg]
    if missing:
        raise ValueError(f"VQGAN config is missing the fields {missing}; every one of {list(CONFIG_FIELDS)} is "
                         f"needed (see dalle_jax/configs/vqgan_common.py).")
    if len(cfg.ch_mult) == 0:
        raise ValueError("ch_mult=() must list at least one channel multiplier, e.g. (1, 2, 2).")
    factor = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.resolution <= 0 or cfg.resolution % factor:
        raise ValueError(f"resolution={cfg.resolution} must be a positive multiple of the downsampling factor "
                         f"{factor} (2 ** (len(ch_mult) - 1) with ch_mult={tuple(cfg.ch_mult)}).")
    if cfg.num_res_blocks < 1:
        raise ValueError(f"num_res_blocks={cfg.num_res_blocks} must be at least 1.")
    sides = [cfg.resolution // 2 ** i for i in range(len(cfg.ch_mult))]
    unreachable = [r for r in cfg.attn_resolutions if r not in sides]
    if unreachable:
        raise ValueError(f"attn_resolutions={tuple(cfg.attn_resolutions)} lists sides {unreachable} that no level "
                         f"has; the feature-map sides of this model are {sides}.")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout={cfg.dropout} must be in [0, 1).")
    check_num_groups(cfg.num_groups, [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult], field="num_groups")
    compute_dtype(cfg.dtype, field="dtype")


def local_encoder(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the encoder is local: it encodes each f x f patch (f = the downsampling factor) on its own, with
    per-position norms and no mid-block attention (attention at `attn_resolutions` stays inside the patch), so a
    code is a function of its patch's pixels alone. Such codes follow the
    picture's content, which makes them far easier for the seq2seq model to predict; with taming's encoder
    (whole-image convolutions, GroupNorm, mid-block attention) an object anywhere can change every code. The
    decoder is the same in both and sees the whole grid."""
    return bool(cfg.local_encoder)


class _Level(nnx.Module):
    """One resolution level: its residual blocks, each followed by attention where the level has it."""

    def __init__(self, blocks: list, attns: list):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)

    def __call__(self, h, *, deterministic: bool, rngs):
        for i, block in enumerate(self.block):
            h = block(h, deterministic=deterministic, rngs=rngs)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _DownLevel(_Level):
    def __init__(self, blocks: list, attns: list, downsample: Downsample | None):
        super().__init__(blocks, attns)
        self.downsample = downsample


class _UpLevel(_Level):
    def __init__(self, blocks: list, attns: list, upsample: Upsample | None):
        super().__init__(blocks, attns)
        self.upsample = upsample


class _Mid(nnx.Module):
    """Residual block, attention (none in a local encoder: num_groups=None), residual block."""

    def __init__(self, channels: int, *, num_groups: int | None, dropout: float, dtype, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, num_groups=num_groups, dropout=dropout, dtype=dtype,
                                   rngs=rngs)
        self.attn_1 = (AttnBlock(channels, num_groups=num_groups, dtype=dtype, rngs=rngs)
                       if num_groups is not None else None)
        self.block_2 = ResnetBlock(channels, channels, num_groups=num_groups, dropout=dropout, dtype=dtype,
                                   rngs=rngs)

    def __call__(self, h, *, deterministic: bool, rngs):
        h = self.block_1(h, deterministic=deterministic, rngs=rngs)
        if self.attn_1 is not None:
            h = self.attn_1(h)
        return self.block_2(h, deterministic=deterministic, rngs=rngs)


class Encoder(nnx.Module):
    """Images (B, H, W, in_channels) -> features (B, H/f, W/f, z_channels); see `local_encoder`."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        self.patch = 2 ** (len(cfg.ch_mult) - 1) if local_encoder(cfg) else None
        num_groups = None if self.patch else cfg.num_groups
        kw = dict(num_groups=num_groups, dtype=dtype, rngs=rngs)
        self.conv_in = conv(cfg.in_channels, cfg.ch, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
        levels, side, block_in = [], cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout=cfg.dropout, **kw))
                block_in = block_out
                if side in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, **kw))
            last = i == len(cfg.ch_mult) - 1
            levels.append(_DownLevel(blocks, attns, None if last else Downsample(block_in, dtype=dtype, rngs=rngs)))
            side = side if last else side // 2
        self.down = nnx.List(levels)
        self.mid = _Mid(block_in, dropout=cfg.dropout, **kw)
        self.norm_out = norm_layer(block_in, num_groups, dtype=dtype, rngs=rngs)
        self.conv_out = conv(block_in, cfg.z_channels, 3, padding=PAD_1, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, deterministic: bool = True, rngs=None):
        if self.patch:
            b, height, width, c = x.shape
            f, gh, gw = self.patch, height // self.patch, width // self.patch
            x = x.reshape(b, gh, f, gw, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * gh * gw, f, f, c)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h, deterministic=deterministic, rngs=rngs)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h, deterministic=deterministic, rngs=rngs)
        h = self.conv_out(nnx.swish(self.norm_out(h)))
        return h.reshape(b, gh, gw, h.shape[-1]) if self.patch else h


class Decoder(nnx.Module):
    """Features (B, h, w, z_channels) -> images (B, h*f, w*f, out_channels). `up[i]` is level i, run last to first."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        kw = dict(num_groups=cfg.num_groups, dtype=dtype, rngs=rngs)
        num_levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        side = cfg.resolution // 2 ** (num_levels - 1)
        self.conv_in = conv(cfg.z_channels, block_in, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
        self.mid = _Mid(block_in, dropout=cfg.dropout, **kw)
        levels = [None] * num_levels
        for i in reversed(range(num_levels)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout=cfg.dropout, **kw))
                block_in = block_out
                if side in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, **kw))
            levels[i] = _UpLevel(blocks, attns, Upsample(block_in, dtype=dtype, rngs=rngs) if i else None)
            side = side * 2 if i else side
        self.up = nnx.List(levels)
        self.norm_out = group_norm(block_in, cfg.num_groups, dtype=dtype, rngs=rngs)
        self.conv_out = conv(block_in, cfg.out_channels, 3, padding=PAD_1, dtype=dtype, rngs=rngs)

    def features(self, z, *, deterministic: bool = True, rngs=None):
        """The activations that feed `conv_out` (after norm_out and swish)."""
        h = self.mid(self.conv_in(z), deterministic=deterministic, rngs=rngs)
        for level in reversed(self.up):
            h = level(h, deterministic=deterministic, rngs=rngs)
            if level.upsample is not None:
                h = level.upsample(h)
        return nnx.swish(self.norm_out(h))

    def __call__(self, z, *, deterministic: bool = True, rngs=None):
        return self.conv_out(self.features(z, deterministic=deterministic, rngs=rngs))


class VQGAN(nnx.Module):
    """Encoder -> quant_conv -> vector quantizer -> post_quant_conv -> decoder.

    The module state is parameters only. With cfg.dropout > 0, a call with deterministic=False needs `rngs=`, a
    PRNG key (or nnx.Rngs with a `dropout` stream), so a train step stays a pure function of its key.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        check_config(cfg)
        dtype = compute_dtype(cfg.dtype)
        self.resolution = int(cfg.resolution)
        self.in_channels = int(cfg.in_channels)
        self.downsample_factor = 2 ** (len(cfg.ch_mult) - 1)
        self.codebook_size = int(cfg.codebook_size)
        self.embed_dim = int(cfg.embed_dim)
        self.dropout = float(cfg.dropout)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = conv(cfg.z_channels, cfg.embed_dim, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, beta=cfg.beta,
                                        l2_normalize=cfg.l2_normalize_codes, rngs=rngs)
        self.post_quant_conv = conv(cfg.embed_dim, cfg.z_channels, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)

    @property
    def grid_size(self) -> int:
        """Side of the token grid for images of the configured resolution."""
        return self.resolution // self.downsample_factor

    def _check_images(self, x) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"VQGAN expects images (B, H, W, {self.in_channels}); got shape {x.shape}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"VQGAN expects float images in [-1, 1]; got dtype {x.dtype}. Convert uint8 images "
                            f"with x / 127.5 - 1.")
        if x.shape[1] % self.downsample_factor or x.shape[2] % self.downsample_factor:
            raise ValueError(f"Image sides {x.shape[1:3]} must be multiples of the downsampling factor "
                             f"{self.downsample_factor}; the model is configured for {self.resolution}.")

    def _check_codes(self, z_q) -> None:
        if z_q.ndim != 4 or z_q.shape[-1] != self.embed_dim:
            raise ValueError(f"decode expects quantized codes (B, h, w, {self.embed_dim}); got shape {z_q.shape}. "
                             f"Use decode_code for integer indices (B, h, w).")

    def _dropout_rngs(self, deterministic: bool, rngs):
        if not deterministic and self.dropout > 0 and rngs is None:
            raise ValueError(f"The VQGAN has dropout={self.dropout}; a call with deterministic=False needs "
                             f"rngs=<PRNG key> (or set dropout=0.0).")
        return as_dropout_rngs(rngs)

    def encode(self, x, *, deterministic: bool = True, rngs=None):
        """Images (B, H, W, 3) in [-1, 1] -> (z_q (B, h, w, embed_dim), indices int32 (B, h, w), aux)."""
        self._check_images(x)
        h = self.encoder(x, deterministic=deterministic, rngs=self._dropout_rngs(deterministic, rngs))
        return self.quantize(self.quant_conv(h))

    def decode(self, z_q, *, deterministic: bool = True, rngs=None):
        """Quantized codes (B, h, w, embed_dim) -> float32 images (B, h*f, w*f, 3)."""
        h = self.last_layer_input(z_q, deterministic=deterministic, rngs=rngs)
        return self.decoder.conv_out(h).astype(jnp.float32)

    def decode_code(self, indices):
        """Code indices (B, h, w), each in [0, codebook_size) -> float32 images (B, h*f, w*f, 3)."""
        if indices.ndim != 3:
            raise ValueError(f"decode_code expects indices (B, h, w); got shape {indices.shape}.")
        return self.decode(self.quantize.codes(indices))

    def last_layer_input(self, z_q, *, deterministic: bool = True, rngs=None):
        """Decoder activations feeding `decoder.conv_out`: decoder.conv_out(last_layer_input(z)) == decode(z)."""
        self._check_codes(z_q)
        return self.decoder.features(self.post_quant_conv(z_q), deterministic=deterministic,
                                     rngs=self._dropout_rngs(deterministic, rngs))

    def __call__(self, x, *, deterministic: bool = True, rngs=None):
        """Images -> (reconstructions float32, aux with codebook_loss, commitment_loss, z_e and indices)."""
        rngs = self._dropout_rngs(deterministic, rngs)
        z_q, indices, aux = self.encode(x, deterministic=deterministic, rngs=rngs)
        x_rec = self.decode(z_q, deterministic=deterministic, rngs=rngs)
        return x_rec, {**aux, "indices": indices}
