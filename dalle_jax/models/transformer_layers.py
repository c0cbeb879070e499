"""Building blocks of DalleBart: attention, GLU/MLP feed-forward, encoder/decoder layers, layer stacks.

The layout is DALL·E mini's: each sublayer is `x + LN_post(sublayer(LN_pre(x)))`, the feed-forward is a GLU
with a norm on its input and on its hidden product, and projections have no bias. Sub-module names follow
min-dalle's so that weights map across by name. Every parameter carries logical axis names.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dalle_jax.parallel import constrain

LAYER_NORM_EPSILON = 1e-5
MASKED_SCORE = -1e9  # attention score given to keys a query may not see
REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer; recompute all of it on the backward pass
    # Saves the projection outputs (matmuls without batch dims), recomputes the attention scores.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
FFN_KINDS = ("glu", "mlp")
# Logical names of the main activations (see parallel.constrain).
EMBED_ACTIVATION = ("batch", "length", "embed")
HEADS_ACTIVATION = ("batch", "length", "heads", None)
MLP_ACTIVATION = ("batch", "length", "mlp")


def dense(in_features: int, out_features: int, names: tuple[str, str], *, dtype, param_dtype,
          rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names), rngs=rngs)


def layer_norm(features: int, *, dtype, param_dtype, rngs: nnx.Rngs,
               one_pass_variance: bool = False) -> nnx.LayerNorm:
    """LayerNorm with statistics in float32. By default the variance is torch's two-pass mean((x - mean)^2);
    `one_pass_variance` takes mean(x^2) - mean^2 instead, both sums in one pass over x, which on a TPU pod saves
    a tenth of DALL·E mega's step (README, "Training on a TPU pod")."""
    return nnx.LayerNorm(
        features, epsilon=LAYER_NORM_EPSILON, dtype=dtype, param_dtype=param_dtype,
        use_fast_variance=one_pass_variance,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) gelu, as torch computes it. Written out because `jax.nn.gelu(approximate=False)` goes
    through erfc, whose gradient compiles to several times more XLA ops."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def key_padding_mask(ids: jax.Array, pad_id: int) -> jax.Array:
    """(B, 1, 1, L) bool: True where the key is a real token (broadcasts over heads and queries)."""
    return (ids != pad_id)[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
    """(1, 1, L, L) bool: query i may see keys 0..i."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def fresh_rng_state(abstract_rng_state, key: jax.Array):
    """Values for a model's abstract rng stream state (its dropout streams): the i-th key leaf comes from
    fold_in(key, i) (split for stacked layers), counts 0."""
    leaves, treedef = jax.tree.flatten(abstract_rng_state)
    values = []
    for i, leaf in enumerate(leaves):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf_key = jax.random.fold_in(key, i)
            values.append(jax.random.split(leaf_key, leaf.shape) if leaf.shape else leaf_key)
        else:
            values.append(jnp.zeros(leaf.shape, leaf.dtype))
    return jax.tree.unflatten(treedef, values)


class Attention(nnx.Module):
    """Multi-head attention without biases. Keys/values are projected by `project_kv`, separately from the
    queries, so a decoding cache can store them once and `attend` to them step by step."""

    def __init__(self, d_model: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}; choose heads dividing d_model.")
        self.heads = heads
        self.head_dim = d_model // heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d_model, d_model, ("embed", "heads"), **kw)
        self.k_proj = dense(d_model, d_model, ("embed", "heads"), **kw)
        self.v_proj = dense(d_model, d_model, ("embed", "heads"), **kw)
        self.out_proj = dense(d_model, d_model, ("heads", "embed"), **kw)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        return constrain(x.reshape(*x.shape[:-1], self.heads, self.head_dim), HEADS_ACTIVATION)

    def project_q(self, x: jax.Array) -> jax.Array:
        """(B, Lq, d_model) -> (B, Lq, heads, head_dim), already scaled by 1/sqrt(head_dim)."""
        return self._split_heads(self.q_proj(x)) * (1.0 / math.sqrt(self.head_dim))

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, Lk, d_model) -> keys and values, each (B, Lk, heads, head_dim)."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
               heads_first: bool = False) -> jax.Array:
        """Scaled queries against keys/values; `mask` (broadcastable to (B, heads, Lq, Lk)) is True where
        attention is allowed. Softmax runs in float32. Keys/values are (B, Lk, heads, head_dim), or with
        `heads_first` (B, heads, Lk, head_dim), the layout the products read without a transpose (decoding
        caches are stored so)."""
        kv = "bhkd" if heads_first else "bkhd"
        scores = jnp.einsum(f"bqhd,{kv}->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores, MASKED_SCORE)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum(f"bhqk,{kv}->bqhd", weights, v)
        return self.out_proj(out.reshape(*out.shape[:2], self.heads * self.head_dim))

    def __call__(self, x: jax.Array, kv_input: jax.Array, mask: jax.Array) -> jax.Array:
        k, v = self.project_kv(kv_input)
        return self.attend(self.project_q(x), k, v, mask)


class GLU(nnx.Module):
    """z = LN0(x); out = LN1(gelu(z @ fc0) * (z @ fc1)) @ fc2, with the exact (erf) gelu."""

    def __init__(self, d_model: int, ffn_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 one_pass_variance: bool = False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln0 = layer_norm(d_model, **kw, one_pass_variance=one_pass_variance)
        self.ln1 = layer_norm(ffn_dim, **kw, one_pass_variance=one_pass_variance)
        self.fc0 = dense(d_model, ffn_dim, ("embed", "mlp"), **kw)
        self.fc1 = dense(d_model, ffn_dim, ("embed", "mlp"), **kw)
        self.fc2 = dense(ffn_dim, d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        z = self.ln0(x)
        w = gelu(constrain(self.fc0(z), MLP_ACTIVATION))
        return self.fc2(self.ln1(w * constrain(self.fc1(z), MLP_ACTIVATION)))


class MLP(nnx.Module):
    """out = gelu(LN(x) @ fc1) @ fc2, the plain alternative to the GLU."""

    def __init__(self, d_model: int, ffn_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 one_pass_variance: bool = False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln = layer_norm(d_model, **kw, one_pass_variance=one_pass_variance)
        self.fc1 = dense(d_model, ffn_dim, ("embed", "mlp"), **kw)
        self.fc2 = dense(ffn_dim, d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(constrain(self.fc1(self.ln(x)), MLP_ACTIVATION)))


def feed_forward(kind: str, d_model: int, ffn_dim: int, **kw) -> nnx.Module:
    if kind == "glu":
        return GLU(d_model, ffn_dim, **kw)
    if kind == "mlp":
        return MLP(d_model, ffn_dim, **kw)
    raise ValueError(f"ffn={kind!r} is not a feed-forward kind; use one of {FFN_KINDS}.")


class EncoderLayer(nnx.Module):
    """[LN -> bidirectional self-attention -> LN] residual, then the feed-forward residual."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, ffn: str, dropout: float, *, dtype, param_dtype,
                 rngs: nnx.Rngs, one_pass_variance: bool = False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm_kw = dict(kw, one_pass_variance=one_pass_variance)
        self.pre_self_attn_layer_norm = layer_norm(d_model, **norm_kw)
        self.self_attn = Attention(d_model, heads, **kw)
        self.self_attn_layer_norm = layer_norm(d_model, **norm_kw)
        self.ffn = feed_forward(ffn, d_model, ffn_dim, **norm_kw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        h = self.pre_self_attn_layer_norm(x)
        h = self.self_attn_layer_norm(self.self_attn(h, h, mask))
        x = x + self.dropout(h, deterministic=deterministic)
        return constrain(x + self.dropout(self.ffn(x), deterministic=deterministic), EMBED_ACTIVATION)


class DecoderLayer(nnx.Module):
    """[LN -> causal self-attention -> LN], [LN -> cross-attention over the text -> LN], feed-forward;
    each a residual."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, ffn: str, dropout: float, *, dtype, param_dtype,
                 rngs: nnx.Rngs, one_pass_variance: bool = False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm_kw = dict(kw, one_pass_variance=one_pass_variance)
        self.pre_self_attn_layer_norm = layer_norm(d_model, **norm_kw)
        self.self_attn = Attention(d_model, heads, **kw)
        self.self_attn_layer_norm = layer_norm(d_model, **norm_kw)
        self.pre_encoder_attn_layer_norm = layer_norm(d_model, **norm_kw)
        self.encoder_attn = Attention(d_model, heads, **kw)
        self.encoder_attn_layer_norm = layer_norm(d_model, **norm_kw)
        self.ffn = feed_forward(ffn, d_model, ffn_dim, **norm_kw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, encoder_states: jax.Array, self_mask: jax.Array, cross_mask: jax.Array, *,
                 deterministic: bool) -> jax.Array:
        h = self.pre_self_attn_layer_norm(x)
        h = self.self_attn_layer_norm(self.self_attn(h, h, self_mask))
        x = x + self.dropout(h, deterministic=deterministic)
        h = self.pre_encoder_attn_layer_norm(x)
        h = self.encoder_attn_layer_norm(self.encoder_attn(h, encoder_states, cross_mask))
        x = x + self.dropout(h, deterministic=deterministic)
        return constrain(x + self.dropout(self.ffn(x), deterministic=deterministic), EMBED_ACTIVATION)


LAYERS_AXIS = "layers"
_STACK_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS}


def create_layer_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, scan: bool,
                       rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` layers: one module with stacked parameters (leading "layers" axis) when `scan`, else a
    list of independent modules."""
    if num_layers < 1:
        raise ValueError(f"a layer stack needs at least one layer, got num_layers={num_layers}.")
    if not scan:
        return nnx.List([make_layer(rngs) for _ in range(num_layers)])

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_STACK_METADATA)
    def create(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    return create(rngs)


def apply_layer_stack(layers: nnx.Module, x: jax.Array, *layer_args: jax.Array, scan: bool, remat: str,
                      deterministic: bool) -> jax.Array:
    """Runs `x` through a stack made by `create_layer_stack`; `layer_args` are passed unchanged to every
    layer. `remat` ("none" | "full" | "dots") is the jax.checkpoint policy applied to each layer."""
    def call(layer, h, *args):
        return layer(h, *args, deterministic=deterministic)

    if remat != "none":
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not a remat policy; use 'none' or one of {tuple(REMAT_POLICIES)}.")
        # Inside a scan the loop already blocks the common-subexpression elimination remat guards against.
        call = nnx.remat(call, policy=REMAT_POLICIES[remat], prevent_cse=not scan)

    if not scan:
        for layer in layers:
            x = call(layer, x, *layer_args)
        return x

    @nnx.scan(in_axes=(nnx.Carry, 0) + (None,) * len(layer_args), out_axes=nnx.Carry,
              transform_metadata=_STACK_METADATA)
    def body(h, layer, *args):
        return call(layer, h, *args)

    return body(x, layers, *layer_args)
