"""PatchGAN discriminator: taming's NLayerDiscriminator layout with GroupNorm (or no norm) in place of BatchNorm,
so it keeps no batch statistics and each image's logits depend on that image alone.

Layout (4x4 convs, padding 1, LeakyReLU 0.2): conv_in (stride 2, no norm) -> blocks[0..num_layers-2] (stride 2)
-> blocks[num_layers-1] (stride 1) -> conv_out (stride 1, 1 channel). Channels: ch * min(2**i, 8).

Sizes: each stride-2 conv maps a side s to floor(s / 2) and each stride-1 conv to s - 1, so the patch map has side
floor(s / 2**num_layers) - 2. The smallest input side is therefore 3 * 2**num_layers (24 for 3 layers, 12 for 2);
a 32x32 image gives a 2x2 patch map with 3 layers and 6x6 with 2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle_jax.models.conv_layers import check_num_groups, compute_dtype, conv, group_norm

NORMS = ("group", "none")
_PAD = ((1, 1), (1, 1))
_INIT = nnx.initializers.normal(0.02)


def min_input_size(num_layers: int) -> int:
    """Smallest image side that leaves at least one patch logit."""
    return 3 * 2 ** num_layers


def patch_grid_size(side: int, num_layers: int) -> int:
    """Side of the patch-logit map for an input of side `side`."""
    return side // 2 ** num_layers - 2


class _DiscBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, *, norm: str, num_groups: int, dtype, rngs):
        # A bias before GroupNorm would be cancelled by the normalisation.
        self.conv = conv(in_ch, out_ch, 4, strides=stride, padding=_PAD, use_bias=norm == "none", dtype=dtype,
                         kernel_init=_INIT, rngs=rngs)
        self.norm = group_norm(out_ch, num_groups, dtype=dtype, rngs=rngs) if norm == "group" else None

    def __call__(self, x):
        h = self.conv(x)
        if self.norm is not None:
            h = self.norm(h)
        return jax.nn.leaky_relu(h, 0.2)


class PatchDiscriminator(nnx.Module):
    """Images (B, H, W, 3) float -> patch logits (B, h, w, 1), float32."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        for field in ("ch", "num_layers", "norm", "num_groups"):
            if field not in cfg:
                raise ValueError(f"Discriminator config is missing the field {field!r} (needs ch, num_layers, "
                                 f"norm, num_groups).")
        if cfg.norm not in NORMS:
            raise ValueError(f"disc.norm={cfg.norm!r} is not supported; use one of {NORMS} (batch norm is not "
                             f"offered: it would make each image's logits depend on its batch).")
        if cfg.num_layers < 1:
            raise ValueError(f"disc.num_layers={cfg.num_layers} must be at least 1.")
        dtype = compute_dtype(cfg.get("dtype", "float32"), field="disc.dtype")
        widths = [cfg.ch * min(2 ** i, 8) for i in range(cfg.num_layers + 1)]
        if cfg.norm == "group":
            check_num_groups(cfg.num_groups, widths[1:], field="disc.num_groups")
        self.num_layers = int(cfg.num_layers)
        self.conv_in = conv(3, widths[0], 4, strides=2, padding=_PAD, dtype=dtype, kernel_init=_INIT, rngs=rngs)
        self.blocks = nnx.List([
            _DiscBlock(widths[i - 1], widths[i], 2 if i < cfg.num_layers else 1, norm=cfg.norm,
                       num_groups=cfg.num_groups, dtype=dtype, rngs=rngs)
            for i in range(1, cfg.num_layers + 1)])
        self.conv_out = conv(widths[-1], 1, 4, padding=_PAD, dtype=dtype, kernel_init=_INIT, rngs=rngs)

    @property
    def min_input_size(self) -> int:
        return min_input_size(self.num_layers)

    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"PatchDiscriminator expects images (B, H, W, 3); got shape {x.shape}.")
        if min(x.shape[1:3]) < self.min_input_size:
            raise ValueError(
                f"PatchDiscriminator with num_layers={self.num_layers} needs image sides >= {self.min_input_size} "
                f"(3 * 2**num_layers); got {x.shape[1:3]}. Use larger images or fewer disc.num_layers.")
        h = jax.nn.leaky_relu(self.conv_in(x), 0.2)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h).astype(jnp.float32)
