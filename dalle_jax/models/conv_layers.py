"""Convolutional building blocks of the VQGAN and its discriminator, laid out as in taming-transformers.

Every parameter carries logical axis names: conv kernels (kh, kw, in, out) -> (None, None, "conv_in", "conv_out"),
conv biases -> ("conv_out",), GroupNorm scale and bias -> ("norm",). Parameters are float32; `dtype` is the
compute dtype. Feature maps carry activation names too (`FEATURE_ACTIVATION`): every conv's output is pinned to
them under `parallel.activation_sharding`, and outside it (plain calls) nothing is.
"""
from __future__ import annotations

import math
from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from dalle_jax.parallel import constrain

CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
NORM_AXES = ("norm",)
PAD_1 = ((1, 1), (1, 1))  # taming's padding=1 for 3x3 convs
# Logical names of a feature map (B, H, W, C) and of attention's flattened (B, H*W, C) and (B, H*W, H*W). The
# channels of an activation are a name of their own, not the kernels' "conv_out": kernels may be split over fsdp
# (gathered before use), activations must not be. Left to itself, the partitioner kept the kernels' fsdp split on
# the feature maps of a data x fsdp x tensor mesh, so attention contracted channels split over two mesh axes
# while its output wanted the batch split over two: XLA returns such a dot's rows on the wrong devices (a
# three-axis mesh is needed; docs/research/spmd_batched_dot.md has the minimal repro).
FEATURE_ACTIVATION = ("batch", None, None, "channels")
TOKENS_ACTIVATION = ("batch", None, "channels")
ATTENTION_ACTIVATION = ("batch", None, None)

# PyTorch's default conv initialisation (uniform, variance 1 / (3 fan_in)): taming's recipes were tuned with it.
TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, field: str = "dtype") -> jnp.dtype:
    """Maps a config's compute-dtype string onto a JAX dtype."""
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r} is not a supported compute dtype; use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def check_num_groups(num_groups: int, channels: Iterable[int], field: str) -> None:
    """Raises unless `num_groups` divides every channel count a GroupNorm will see."""
    channels = sorted(set(int(c) for c in channels))
    if not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"{field}={num_groups!r} must be a positive integer.")
    bad = [c for c in channels if c % num_groups]
    if bad:
        raise ValueError(
            f"{field}={num_groups} does not divide the channel counts {bad} (all GroupNorm channel counts: "
            f"{channels}). Choose {field} as a common divisor of them, e.g. {_common_divisor(channels, num_groups)}.")


def _common_divisor(channels: list[int], below: int) -> int:
    g = math.gcd(*channels)
    return max(d for d in range(1, min(g, below) + 1) if g % d == 0)


class Conv(nnx.Conv):
    """nnx.Conv (NHWC) whose output is pinned to `FEATURE_ACTIVATION` under `parallel.activation_sharding`."""

    def __call__(self, inputs):
        return constrain(super().__call__(inputs), FEATURE_ACTIVATION)


def conv(in_features: int, out_features: int, kernel_size: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
         strides: int = 1, padding="SAME", use_bias: bool = True, kernel_init=TORCH_CONV_INIT) -> Conv:
    """A 2-d conv (NHWC) whose kernel and bias carry the conv logical axis names."""
    return Conv(
        in_features, out_features, (kernel_size, kernel_size), strides=strides, padding=padding,
        use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(kernel_init, CONV_KERNEL_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), CONV_BIAS_AXES),
        rngs=rngs)


def group_norm(num_features: int, num_groups: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.GroupNorm:
    # Two-pass variance, as PyTorch computes it, so imported weights see the same statistics.
    return nnx.GroupNorm(
        num_features, num_groups=num_groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), NORM_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), NORM_AXES),
        rngs=rngs)


def pixel_norm(num_features: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.LayerNorm:
    """Normalises each position over its channels alone: unlike GroupNorm, no statistic crosses positions."""
    return nnx.LayerNorm(
        num_features, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), NORM_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), NORM_AXES),
        rngs=rngs)


def norm_layer(num_features: int, num_groups: int | None, *, rngs: nnx.Rngs, dtype=jnp.float32):
    """GroupNorm with `num_groups` groups, or `pixel_norm` when `num_groups` is None."""
    if num_groups is None:
        return pixel_norm(num_features, rngs=rngs, dtype=dtype)
    return group_norm(num_features, num_groups, rngs=rngs, dtype=dtype)


def as_dropout_rngs(rngs: nnx.Rngs | jax.Array | None) -> nnx.Rngs | None:
    """Accepts a PRNG key for dropout and wraps it so that each dropout layer draws its own key from it."""
    if rngs is None or isinstance(rngs, nnx.Rngs):
        return rngs
    return nnx.Rngs(dropout=rngs)


class ResnetBlock(nnx.Module):
    """Norm-swish-conv twice with a residual; a 1x1 `nin_shortcut` when the channel count changes.
    The norms are GroupNorm, or per-position `pixel_norm` with num_groups=None."""

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int | None, dropout: float, dtype,
                 rngs: nnx.Rngs):
        self.norm1 = norm_layer(in_channels, num_groups, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_channels, out_channels, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
        self.norm2 = norm_layer(out_channels, num_groups, dtype=dtype, rngs=rngs)
        # No RNG stream is stored: dropout keys come from the caller, so the module state is parameters only.
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, 3, padding=PAD_1, dtype=dtype, rngs=rngs)
        self.nin_shortcut = (conv(in_channels, out_channels, 1, padding="VALID", dtype=dtype, rngs=rngs)
                             if in_channels != out_channels else None)

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        h = self.conv1(nnx.swish(self.norm1(x)))
        h = nnx.swish(self.norm2(h))
        h = self.conv2(self.dropout(h, deterministic=deterministic, rngs=rngs))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all positions of a feature map, q/k/v/proj_out as 1x1 convs."""

    def __init__(self, channels: int, *, num_groups: int | None, dtype, rngs: nnx.Rngs):
        self.norm = norm_layer(channels, num_groups, dtype=dtype, rngs=rngs)
        self.q = conv(channels, channels, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.k = conv(channels, channels, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.v = conv(channels, channels, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.proj_out = conv(channels, channels, 1, padding="VALID", dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, height, width, c = x.shape
        h = self.norm(x)
        q, k, v = (constrain(layer(h).reshape(b, height * width, c), TOKENS_ACTIVATION)
                   for layer in (self.q, self.k, self.v))
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(constrain(logits, ATTENTION_ACTIVATION), axis=-1).astype(v.dtype)
        h = constrain(jnp.einsum("bij,bjc->bic", weights, v), TOKENS_ACTIVATION).reshape(b, height, width, c)
        return x + self.proj_out(h)


class Downsample(nnx.Module):
    """Halves the side: zero-pad one row/column at the bottom/right, then a 3x3 stride-2 valid conv."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, strides=2, padding="VALID", dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample(nnx.Module):
    """Doubles the side: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, padding=PAD_1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, height, width, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
        return self.conv(x.reshape(b, 2 * height, 2 * width, c))
