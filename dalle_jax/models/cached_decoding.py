"""DalleBart's decoder run one image token at a time, with a key/value cache.

Per prompt, `encode_prompt` runs the encoder once and projects every decoder layer's cross-attention keys and
values from it. Per step, `decode_step` embeds one token, writes that token's self-attention keys/values into
a preallocated cache at its position, and attends to positions <= the current one.

Caches and cross-attention keys/values are stored heads first, (B, heads, length, head_dim) per layer, the layout
attention's products read without a transpose. For a scanned stack they are stacked on a leading layer axis; for
an unrolled stack (`nnx.List`) they are tuples of per-layer arrays, so that a step reads each layer's cache where
it lies instead of slicing a copy out of a stack. The cache is a loop carry: each step writes one position of
one layer in place (`dynamic_update_slice`). A scanned stack is walked with `nnx.scan` over its stacked
parameters together with the stacked cross keys/values and the layer index; an unrolled stack with a Python loop
over the same per-layer function.

On the CPU, `use_row_products` can switch a decoding step's projections to transposed kernels (see there).

The per-layer step mirrors `transformer_layers.DecoderLayer.__call__` (inference: no dropout); the tests hold
the two equal by checking step-by-step logits against the teacher-forced `DalleBart.decode`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dalle_jax.models import transformer_layers as tl
from dalle_jax.models.dalle_bart import TEXT_PAD_ID, DalleBart
from dalle_jax.parallel import constrain

_STACK_METADATA = {nnx.PARTITION_NAME: tl.LAYERS_AXIS}
KV_ACTIVATION = (tl.LAYERS_AXIS, "batch", "heads", "length", None)


class KeyValues(NamedTuple):
    """Attention keys and values of every decoder layer: each (layers, B, heads, length, head_dim) for a scanned
    stack, a tuple of per-layer (B, heads, length, head_dim) arrays for an unrolled one."""
    keys: jax.Array | tuple[jax.Array, ...]
    values: jax.Array | tuple[jax.Array, ...]

    @property
    def rows(self) -> int:
        """The batch size they were made for."""
        return jax.tree.leaves(self.keys)[0].shape[-4]

    @property
    def dtype(self):
        return jax.tree.leaves(self.keys)[0].dtype


def _sharded(keys, values) -> KeyValues:
    if isinstance(keys, (tuple, list)):
        return KeyValues(*(tuple(constrain(x, KV_ACTIVATION[1:]) for x in xs) for xs in (keys, values)))
    return KeyValues(constrain(keys, KV_ACTIVATION), constrain(values, KV_ACTIVATION))


def _heads_first(x: jax.Array) -> jax.Array:
    """(..., length, heads, head_dim) -> (..., heads, length, head_dim)."""
    return jnp.swapaxes(x, -3, -2)


def _first_layer(model: DalleBart) -> tl.DecoderLayer:
    layers = model.decoder.layers
    return layers if model.decoder.scan_layers else layers[0]


def num_decoder_layers(model: DalleBart) -> int:
    if model.decoder.scan_layers:
        return model.decoder.layers.self_attn.q_proj.kernel.shape[0]
    return len(model.decoder.layers)


def encode_prompt(model: DalleBart, text_ids: jax.Array) -> tuple[KeyValues, jax.Array]:
    """(B, Lt) text ids -> the cross-attention keys/values of every decoder layer and the (B, 1, 1, Lt)
    cross-attention mask (False at `<pad>`), everything a decoding step needs from the prompt."""
    encoder_states = model.encode(text_ids)
    if model.decoder.scan_layers:
        @nnx.vmap(in_axes=(0, None), out_axes=0, transform_metadata=_STACK_METADATA)
        def project(layer, states):
            return layer.encoder_attn.project_kv(states)

        keys, values = (_heads_first(x) for x in project(model.decoder.layers, encoder_states))
    else:
        per_layer = [layer.encoder_attn.project_kv(encoder_states) for layer in model.decoder.layers]
        keys, values = (tuple(_heads_first(x) for x in xs) for xs in zip(*per_layer))
    return _sharded(keys, values), tl.key_padding_mask(text_ids, TEXT_PAD_ID)


def init_cache(model: DalleBart, batch_size: int, dtype) -> KeyValues:
    """Zeroed self-attention cache for `batch_size` rows and all `image_length` positions. `dtype` should be
    the `dtype` of the keys `encode_prompt` returned (the model's compute dtype)."""
    attn = _first_layer(model).self_attn
    shape = (batch_size, attn.heads, model.image_length, attn.head_dim)
    layers = num_decoder_layers(model)
    if model.decoder.scan_layers:
        return _sharded(*(jnp.zeros((layers, *shape), dtype) for _ in range(2)))
    return _sharded(*(tuple(jnp.zeros(shape, dtype) for _ in range(layers)) for _ in range(2)))


# XLA:CPU multiplies a few rows by a (K, N) weight matrix at a fraction of the memory bandwidth; with the matrix
# stored (N, K), contracting the minor axis of both operands, the same product streams the weights about twice as
# fast, and one row at a time (a matrix-vector product each) faster still for up to 2 rows. A decoding step is
# bound by reading the weights (bench/sampling.py).
ROW_PRODUCT_MAX_ROWS = 64
ONE_ROW_AT_A_TIME_MAX_ROWS = 2


def _rows_times_transposed(x, kernel_t, dimension_numbers=None, precision=None, preferred_element_type=None,
                           out_sharding=None):
    """`x @ kernel_t.T` for x (..., K) and kernel_t (N, K); stands in for `lax.dot_general` in the nnx.Linear
    layers that `use_row_products` switched."""
    del dimension_numbers, out_sharding  # the layout is fixed: x's last axis against kernel_t's last
    product = functools.partial(jax.lax.dot_general, dimension_numbers=(((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=preferred_element_type)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] > ONE_ROW_AT_A_TIME_MAX_ROWS:
        out = product(flat, kernel_t)
    else:  # the barrier keeps XLA from merging the rows' products back into one
        out = jnp.concatenate([product(jax.lax.optimization_barrier(flat[i:i + 1]), kernel_t)
                               for i in range(flat.shape[0])])
    return out.reshape(*x.shape[:-1], kernel_t.shape[0])


def use_row_products(model: DalleBart) -> None:
    """Stores every kernel that `decode_step` multiplies by transposed, (..., out, in), and makes its layer compute
    with `_rows_times_transposed`: on XLA:CPU, for a few rows per device (<= ROW_PRODUCT_MAX_ROWS), this reads the
    weights about twice as fast. Changes `model` in place: merged inside the trace that decodes, the transposes
    run once per call, before the token loop; on a model outside any trace (`sampling.with_row_products`), once
    for every later call. Layers already switched are left alone. The encoder and the cross-attention key/value
    projections (`encode_prompt`, many rows) keep their layout."""
    decoder = model.decoder
    linears = [decoder.lm_head]
    for layer in [decoder.layers] if decoder.scan_layers else list(decoder.layers):
        for attn, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "out_proj")),
                            (layer.encoder_attn, ("q_proj", "out_proj"))):
            linears += [getattr(attn, name) for name in names]
        linears += [getattr(layer.ffn, name) for name in ("fc0", "fc1", "fc2") if hasattr(layer.ffn, name)]
    for linear in (linear for linear in linears if linear.dot_general is not _rows_times_transposed):
        linear.kernel.set_value(jnp.swapaxes(linear.kernel.get_value(), -1, -2))
        linear.dot_general = _rows_times_transposed


def _layer_step(layer: tl.DecoderLayer, x: jax.Array, cache: KeyValues, index, position: jax.Array,
                cross_keys: jax.Array, cross_values: jax.Array, self_mask: jax.Array,
                cross_mask: jax.Array) -> tuple[jax.Array, KeyValues]:
    """One decoder layer on one position: x (B, 1, d_model). `cache` is every layer's, stacked, with `index` the
    layer's slot, or (index None) this layer's alone."""
    h = layer.pre_self_attn_layer_norm(x)
    k, v = (_heads_first(t) for t in layer.self_attn.project_kv(h))
    start = (0, 0, position, 0) if index is None else (index, 0, 0, position, 0)
    if index is not None:
        k, v = k[None], v[None]
    cache = KeyValues(jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), start),
                      jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), start))
    layer_keys, layer_values = cache if index is None else (
        jax.lax.dynamic_index_in_dim(xs, index, keepdims=False) for xs in cache)
    h = layer.self_attn.attend(layer.self_attn.project_q(h), layer_keys, layer_values, self_mask, heads_first=True)
    x = x + layer.self_attn_layer_norm(h)
    h = layer.pre_encoder_attn_layer_norm(x)
    h = layer.encoder_attn.attend(layer.encoder_attn.project_q(h), cross_keys, cross_values, cross_mask,
                                  heads_first=True)
    x = x + layer.encoder_attn_layer_norm(h)
    return constrain(x + layer.ffn(x), tl.EMBED_ACTIVATION), cache


def decode_step(model: DalleBart, token_ids: jax.Array, position: jax.Array, cache: KeyValues,
                cross_kv: KeyValues, cross_mask: jax.Array) -> tuple[jax.Array, KeyValues]:
    """Decoder input `token_ids` (B,) at `position` (scalar, 0 <= position < image_length) -> float32 logits
    (B, padded_vocab_size) for the token at `position`, non-codebook columns at MASKED_LOGIT, and the cache
    with this position's keys/values written. Position 0's input is the start token.

    `model` must belong to the trace that calls this (inside a `lax.scan`/`fori_loop` body, merge it there with
    `nnx.merge(graphdef, state, copy=True)`): the scanned stack goes through `nnx.scan`, which refuses
    Variables of an enclosing trace."""
    if token_ids.ndim != 1 or token_ids.shape[0] != cache.rows:
        raise ValueError(f"token_ids must have shape (batch,) = ({cache.rows},) to match the cache, "
                         f"got {token_ids.shape}; pass one previous token per row.")
    if cross_kv.rows != token_ids.shape[0]:
        raise ValueError(f"cross_kv holds {cross_kv.rows} rows but token_ids {token_ids.shape[0]}; "
                         f"encode the same batch of prompts as the cache was made for.")
    decoder = model.decoder
    position = jnp.asarray(position, jnp.int32)
    x = decoder.embed_image_tokens(token_ids[:, None]) + decoder.position_embeddings(position)[None, None]
    x = constrain(decoder.layernorm_embedding(x), tl.EMBED_ACTIVATION)
    self_mask = (jnp.arange(model.image_length) <= position)[None, None, None, :]

    if decoder.scan_layers:
        @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, 0), out_axes=nnx.Carry, transform_metadata=_STACK_METADATA)
        def body(carry, layer, index, cross_keys, cross_values):
            h, c = carry
            return _layer_step(layer, h, c, index, position, cross_keys, cross_values, self_mask, cross_mask)

        indices = jnp.arange(num_decoder_layers(model), dtype=jnp.int32)
        x, cache = body((x, cache), decoder.layers, indices, cross_kv.keys, cross_kv.values)
    else:
        per_layer = []
        for layer, keys, values, cross_keys, cross_values in zip(decoder.layers, *cache, *cross_kv):
            x, layer_cache = _layer_step(layer, x, KeyValues(keys, values), None, position, cross_keys,
                                         cross_values, self_mask, cross_mask)
            per_layer.append(layer_cache)
        cache = KeyValues(*(tuple(xs) for xs in zip(*per_layer)))

    return decoder.output_logits(x)[:, 0], cache
