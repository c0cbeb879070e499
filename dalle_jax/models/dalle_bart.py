"""DalleBart: the BART-style encoder-decoder that predicts image tokens from caption tokens.

The encoder reads text ids (BART ids, `<pad>`=1 masked out of attention); the decoder reads
`[start] + image_tokens[:-1]` (start id = image_vocab_size) and returns float32 logits over the image
vocabulary padded to a multiple of `vocab_multiple`, where every column that is not a codebook index is
pushed to -1e9. Layer layout and module names follow DALL·E mini / min-dalle.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle_jax.models import transformer_layers as tl
from dalle_jax.parallel import constrain

TEXT_PAD_ID = 1
MASKED_LOGIT = -1e9
CONFIG_FIELDS = (
    "text_vocab_size", "text_length", "image_vocab_size", "image_length", "d_model", "encoder_layers",
    "decoder_layers", "heads", "ffn_dim", "ffn", "dropout", "dtype", "param_dtype", "scan_layers", "remat",
    "vocab_multiple", "image_positions", "layer_norm_variance",
)
IMAGE_POSITIONS = ("flat", "rows_cols")
LAYER_NORM_VARIANCES = ("two_pass", "one_pass")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def padded_image_vocab_size(image_vocab_size: int, vocab_multiple: int) -> int:
    """Width of the output head: codebook + start token, rounded up to a multiple of `vocab_multiple`."""
    return -(-(image_vocab_size + 1) // vocab_multiple) * vocab_multiple


def teacher_forcing_inputs(image_tokens: jax.Array, start_token: int) -> jax.Array:
    """(B, L) image tokens -> decoder inputs `[start] + tokens[:-1]`."""
    start = jnp.full((image_tokens.shape[0], 1), start_token, dtype=image_tokens.dtype)
    return jnp.concatenate([start, image_tokens[:, :-1]], axis=1)


def validate_config(cfg: ml_collections.ConfigDict, fields: tuple[str, ...] = CONFIG_FIELDS) -> None:
    """Fails naming the field on a config that does not build a model; `fields` are all the model's fields (a
    subclass passes its own)."""
    missing = [f for f in fields if f not in cfg]
    if missing:
        raise ValueError(f"DalleBart config lacks field(s) {missing}; it needs exactly {list(fields)}.")
    extra = [f for f in cfg.keys() if f not in fields]
    if extra:
        raise ValueError(f"DalleBart config has unknown field(s) {extra}; the fields are {list(fields)}.")
    for field in ("text_vocab_size", "text_length", "image_vocab_size", "image_length", "d_model", "encoder_layers",
                  "decoder_layers", "heads", "ffn_dim", "vocab_multiple"):
        if int(cfg[field]) < 1:
            raise ValueError(f"config.{field}={cfg[field]} must be a positive integer.")
    if cfg.text_vocab_size <= TEXT_PAD_ID:
        raise ValueError(f"config.text_vocab_size={cfg.text_vocab_size} must include the BART special ids 0-3.")
    if cfg.d_model % cfg.heads:
        raise ValueError(f"config.d_model={cfg.d_model} is not divisible by config.heads={cfg.heads}; "
                         f"choose heads dividing d_model.")
    if cfg.ffn not in tl.FFN_KINDS:
        raise ValueError(f"config.ffn={cfg.ffn!r} is unknown; use one of {tl.FFN_KINDS}.")
    if cfg.remat != "none" and cfg.remat not in tl.REMAT_POLICIES:
        raise ValueError(f"config.remat={cfg.remat!r} is unknown; use 'none' or one of {tuple(tl.REMAT_POLICIES)}.")
    for field in ("dtype", "param_dtype"):
        if cfg[field] not in DTYPES:
            raise ValueError(f"config.{field}={cfg[field]!r} is unknown; use one of {tuple(DTYPES)}.")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"config.dropout={cfg.dropout} must be in [0, 1).")
    if cfg.layer_norm_variance not in LAYER_NORM_VARIANCES:
        raise ValueError(f"config.layer_norm_variance={cfg.layer_norm_variance!r} is unknown; use one of "
                         f"{LAYER_NORM_VARIANCES}.")
    positions = cfg.image_positions
    if positions not in IMAGE_POSITIONS:
        raise ValueError(f"config.image_positions={positions!r} is unknown; use one of {IMAGE_POSITIONS}.")
    side = int(round(cfg.image_length ** 0.5))
    if positions == "rows_cols" and side * side != cfg.image_length:
        raise ValueError(f"config.image_positions='rows_cols' needs a square image grid, but "
                         f"config.image_length={cfg.image_length} is not a square; use 'flat'.")


def layer_norm_options(cfg: ml_collections.ConfigDict) -> dict:
    """`layer_norm_variance`: "two_pass" (torch's) or "one_pass" (faster on TPUs; equal up to float32 rounding for
    activations whose mean is not far larger than their spread)."""
    return dict(one_pass_variance=cfg.layer_norm_variance == "one_pass")


def _check_ids(name: str, ids: jax.Array, max_length: int, field: str) -> None:
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, length), got shape {ids.shape}.")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}.")
    if ids.shape[1] > max_length:
        raise ValueError(f"{name} has length {ids.shape[1]} > config.{field}={max_length}; "
                         f"truncate the input or raise config.{field}.")


def _embedding(num: int, features: int, names: tuple[str, str], **kw) -> nnx.Embed:
    return nnx.Embed(num, features, embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), names), **kw)


class Encoder(nnx.Module):
    """Token + position embeddings, LayerNorm, bidirectional layers (`<pad>` keys masked), final LayerNorm."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        kw = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)
        norm_kw = dict(kw, **layer_norm_options(cfg))
        self.scan_layers, self.remat = bool(cfg.scan_layers), str(cfg.remat)
        self.embed_tokens = _embedding(cfg.text_vocab_size, cfg.d_model, ("vocab", "embed"), **kw)
        self.embed_positions = _embedding(cfg.text_length, cfg.d_model, ("length", "embed"), **kw)
        self.layernorm_embedding = tl.layer_norm(cfg.d_model, **norm_kw)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.layers = tl.create_layer_stack(
            lambda r: tl.EncoderLayer(cfg.d_model, cfg.heads, cfg.ffn_dim, cfg.ffn, cfg.dropout, dtype=kw["dtype"],
                                      param_dtype=kw["param_dtype"], rngs=r, **layer_norm_options(cfg)),
            cfg.encoder_layers, scan=self.scan_layers, rngs=rngs)
        self.final_ln = tl.layer_norm(cfg.d_model, **norm_kw)

    def __call__(self, text_ids: jax.Array, *, deterministic: bool) -> jax.Array:
        x = self.embed_tokens(text_ids) + self.embed_positions(jnp.arange(text_ids.shape[1]))[None]
        x = constrain(self.dropout(self.layernorm_embedding(x), deterministic=deterministic), tl.EMBED_ACTIVATION)
        x = tl.apply_layer_stack(self.layers, x, tl.key_padding_mask(text_ids, TEXT_PAD_ID), scan=self.scan_layers,
                                 remat=self.remat, deterministic=deterministic)
        return self.final_ln(x)


class Decoder(nnx.Module):
    """Image-token + position embeddings, LayerNorm, causal layers with cross-attention over the text,
    final LayerNorm, untied output head. A subclass may replace how image tokens are embedded and scored
    (`init_image_token_embedding`, `embed_image_tokens`, `output_logits`)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        kw = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)
        norm_kw = dict(kw, **layer_norm_options(cfg))
        self.scan_layers, self.remat = bool(cfg.scan_layers), str(cfg.remat)
        self.image_vocab_size = int(cfg.image_vocab_size)
        self.padded_vocab_size = padded_image_vocab_size(cfg.image_vocab_size, cfg.vocab_multiple)
        self.init_image_token_embedding(cfg, kw)
        if cfg.image_positions == "rows_cols":
            self.grid_side = int(round(cfg.image_length ** 0.5))
            self.embed_rows = _embedding(self.grid_side, cfg.d_model, ("length", "embed"), **kw)
            self.embed_cols = _embedding(self.grid_side, cfg.d_model, ("length", "embed"), **kw)
        else:
            self.embed_positions = _embedding(cfg.image_length, cfg.d_model, ("length", "embed"), **kw)
        self.layernorm_embedding = tl.layer_norm(cfg.d_model, **norm_kw)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.layers = tl.create_layer_stack(
            lambda r: tl.DecoderLayer(cfg.d_model, cfg.heads, cfg.ffn_dim, cfg.ffn, cfg.dropout, dtype=kw["dtype"],
                                      param_dtype=kw["param_dtype"], rngs=r, **layer_norm_options(cfg)),
            cfg.decoder_layers, scan=self.scan_layers, rngs=rngs)
        self.final_ln = tl.layer_norm(cfg.d_model, **norm_kw)
        self.lm_head = tl.dense(cfg.d_model, self.padded_vocab_size, ("embed", "vocab"), **kw)

    def init_image_token_embedding(self, cfg: ml_collections.ConfigDict, kw: dict) -> None:
        """The parameters that embed image tokens (`kw`: dtype, param_dtype and rngs of the other layers)."""
        self.embed_tokens = _embedding(cfg.image_vocab_size + 1, cfg.d_model, ("vocab", "embed"), **kw)

    def embed_image_tokens(self, ids: jax.Array) -> jax.Array:
        return self.embed_tokens(ids)

    def output_logits(self, x: jax.Array) -> jax.Array:
        """Final LayerNorm and output head: (B, L, d_model) -> (B, L, padded_vocab_size) float32, columns that are
        not codebook indices pushed to MASKED_LOGIT."""
        x = self.final_ln(x)
        return self.mask_non_codes(self.head_logits(x))

    def head_logits(self, x: jax.Array) -> jax.Array:
        """(B, L, d_model) normalised states -> (B, L, padded_vocab_size) float32 logits of every column."""
        return constrain(self.lm_head(x), ("batch", "length", "vocab")).astype(jnp.float32)

    def mask_non_codes(self, logits: jax.Array) -> jax.Array:
        is_codebook_index = jnp.arange(self.padded_vocab_size) < self.image_vocab_size
        return jnp.where(is_codebook_index, logits, MASKED_LOGIT)

    def position_embeddings(self, positions: jax.Array) -> jax.Array:
        """Row-major image positions (any shape) -> their embeddings (positions.shape + (d_model,))."""
        if hasattr(self, "embed_rows"):
            return self.embed_rows(positions // self.grid_side) + self.embed_cols(positions % self.grid_side)
        return self.embed_positions(positions)

    def __call__(self, image_input_ids: jax.Array, encoder_states: jax.Array, text_ids: jax.Array, *,
                 deterministic: bool) -> jax.Array:
        length = image_input_ids.shape[1]
        x = self.embed_image_tokens(image_input_ids) + self.position_embeddings(jnp.arange(length))[None]
        x = constrain(self.dropout(self.layernorm_embedding(x), deterministic=deterministic), tl.EMBED_ACTIVATION)
        x = tl.apply_layer_stack(
            self.layers, x, encoder_states, tl.causal_mask(length), tl.key_padding_mask(text_ids, TEXT_PAD_ID),
            scan=self.scan_layers, remat=self.remat, deterministic=deterministic)
        return self.output_logits(x)


class DalleBart(nnx.Module):
    """Text ids -> image-token logits. `rngs` needs a "params" stream, and a "dropout" stream for training."""
    decoder_class = Decoder

    @classmethod
    def validate_config(cls, cfg: ml_collections.ConfigDict) -> None:
        validate_config(cfg)

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.validate_config(cfg)
        try:
            rngs["dropout"]
        except KeyError:
            raise ValueError('DalleBart needs a "dropout" rng stream: pass nnx.Rngs(params=..., dropout=...).') \
                from None
        self.text_length = int(cfg.text_length)
        self.image_length = int(cfg.image_length)
        self.image_vocab_size = int(cfg.image_vocab_size)
        self.start_token = int(cfg.image_vocab_size)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = self.decoder_class(cfg, rngs=rngs)

    @property
    def padded_vocab_size(self) -> int:
        return self.decoder.padded_vocab_size

    def encode(self, text_ids: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """(B, Lt) text ids, Lt <= text_length -> (B, Lt, d_model) encoder states."""
        _check_ids("text_ids", text_ids, self.text_length, "text_length")
        return self.encoder(text_ids, deterministic=deterministic)

    def decode(self, image_input_ids: jax.Array, encoder_states: jax.Array, text_ids: jax.Array, *,
               deterministic: bool = True) -> jax.Array:
        """Teacher-forced decoder: (B, L) inputs `[start] + tokens[:-1]`, L <= image_length ->
        (B, L, padded_vocab_size) float32 logits; `text_ids` supplies the cross-attention padding mask."""
        _check_ids("image_input_ids", image_input_ids, self.image_length, "image_length")
        _check_ids("text_ids", text_ids, self.text_length, "text_length")
        if encoder_states.shape[:2] != text_ids.shape:
            raise ValueError(f"encoder_states shape {encoder_states.shape} does not match text_ids shape "
                             f"{text_ids.shape}; pass the states that encode() returned for these text_ids.")
        if image_input_ids.shape[0] != text_ids.shape[0]:
            raise ValueError(f"image_input_ids batch {image_input_ids.shape[0]} != text_ids batch "
                             f"{text_ids.shape[0]}.")
        return self.decoder(image_input_ids, encoder_states, text_ids, deterministic=deterministic)

    def __call__(self, text_ids: jax.Array, image_input_ids: jax.Array, *, deterministic: bool = True) -> jax.Array:
        _check_ids("image_input_ids", image_input_ids, self.image_length, "image_length")
        encoder_states = self.encode(text_ids, deterministic=deterministic)
        return self.decode(image_input_ids, encoder_states, text_ids, deterministic=deterministic)


def unrolled_equivalent(cfg: ml_collections.ConfigDict, params: dict) -> tuple[ml_collections.ConfigDict, dict]:
    """A config with `scan_layers` and its parameters (pure dict) -> the same model with its layers unrolled
    (`scan_layers=False`): every stacked leaf under `encoder.layers` and `decoder.layers` split along its leading
    layer axis. Configs without scanned layers come back unchanged."""
    if not cfg.scan_layers:
        return cfg, params
    params = dict(params)
    for part in ("encoder", "decoder"):
        stack = params[part].get("layers")
        if stack:
            count = jax.tree.leaves(stack)[0].shape[0]
            params[part] = dict(params[part], layers={i: jax.tree.map(lambda x, i=i: x[i], stack)
                                                      for i in range(count)})
    unrolled_cfg = ml_collections.ConfigDict(cfg.to_dict())
    unrolled_cfg.scan_layers = False
    return unrolled_cfg, params


def train_flops_per_example(cfg: ml_collections.ConfigDict) -> float:
    """Model FLOPs of one training example (forward + backward = 3x forward) at full text and image length.

    Counts the matmuls (2 FLOPs per multiply-add): projections, attention scores and weighted sums, feed-forward
    and the output head; norms, softmax and embedding lookups are left out, as is usual for MFU.
    """
    d, f, lt, li = cfg.d_model, cfg.ffn_dim, cfg.text_length, cfg.image_length
    ffn = (3 if cfg.ffn == "glu" else 2) * d * f
    encoder_token = 4 * d * d + 2 * lt * d + ffn  # q, k, v, out; scores and sums over lt keys; feed-forward
    # Self-attention (4 projections, li keys), cross-attention (q and out projections, lt keys), feed-forward.
    decoder_token = 4 * d * d + 2 * li * d + 2 * d * d + 2 * lt * d + ffn
    cross_kv_text_token = 2 * d * d  # each decoder layer projects the text states to keys and values
    head = d * padded_image_vocab_size(cfg.image_vocab_size, cfg.vocab_multiple)
    forward_macs = (cfg.encoder_layers * lt * encoder_token
                    + cfg.decoder_layers * (li * decoder_token + lt * cross_kv_text_token) + li * head)
    return 3.0 * 2.0 * forward_macs
