"""An image-to-caption model that scores how well a picture matches a prompt: log p(prompt | image).

The sampler draws several candidates per prompt; the seq2seq model's own likelihood of its draws cannot tell a
right picture from a wrong one it finds equally likely, but a model that reads the picture can. The image is cut
into patches, embedded by one linear layer and read by bidirectional encoder layers; a causal text decoder
cross-attends to the patches and predicts the caption's next token.

With `config.reads = "code_features"` the model reads the sampled codes instead of their pictures, so no candidate
is decoded to be scored: each code is described by a fixed per-code feature table (measured by an extension's
`code_feature_table` hook, e.g. where the code draws and in which colour), embedded by one linear layer, and a 3x3
convolution over the code grid adds what its neighbours show before the encoder layers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle_jax.data import text as text_lib
from dalle_jax.models import transformer_layers as tl


READS = ("pixels", "code_features")


def reads(config: ml_collections.ConfigDict) -> str:
    """What the model reads of a candidate: "pixels" (its decoded picture) or "code_features" (its codes)."""
    return str(config.reads)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails, naming the field, on a shape the model cannot be built with."""
    if reads(config) not in READS:
        raise ValueError(f"config.model.reads={reads(config)!r}; use one of {READS}.")
    picture_fields = ("image_size", "patch_size") if reads(config) == "pixels" else (
        "image_length", "image_vocab_size", "code_features")
    for field in picture_fields + ("text_length", "vocab_size", "d_model", "heads", "ffn_dim", "encoder_layers",
                                   "decoder_layers"):
        if int(config[field]) < 1:
            raise ValueError(f"config.model.{field}={config[field]} must be at least 1.")
    if reads(config) == "code_features":
        if math.isqrt(int(config.image_length)) ** 2 != config.image_length:
            raise ValueError(f"config.model.image_length={config.image_length} must be a square grid of codes.")
    elif config.image_size % config.patch_size:
        raise ValueError(f"config.model.patch_size={config.patch_size} must divide config.model.image_size="
                         f"{config.image_size}.")
    if config.d_model % config.heads:
        raise ValueError(f"config.model.heads={config.heads} must divide config.model.d_model={config.d_model}.")


class Captioner(nnx.Module):
    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate_config(config)
        self.pad_id = text_lib.PAD_ID
        self.reads = reads(config)
        d = int(config.d_model)
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        layer_args = (d, int(config.heads), int(config.ffn_dim), "mlp", 0.0)
        if self.reads == "pixels":
            self.patch_size = int(config.patch_size)
            self.grid = int(config.image_size) // self.patch_size
            self.patch_embed = nnx.Linear(self.patch_size ** 2 * 3, d, rngs=rngs)
        else:
            self.grid = math.isqrt(int(config.image_length))
            # Fixed (training/optimizers.FROZEN); the trainer measures them. One row per code and the seq2seq
            # model's start token, as the extension's `code_feature_table` hook gives them.
            self.code_features = nnx.Param(jnp.zeros((int(config.image_vocab_size) + 1, int(config.code_features)),
                                                     jnp.float32))
            self.feature_embed = nnx.Linear(int(config.code_features), d, rngs=rngs)
            self.neighbourhood = nnx.Conv(d, d, (3, 3), rngs=rngs)
        self.patch_positions = nnx.Param(jax.random.normal(rngs.params(), (self.grid ** 2, d)) * 0.02)
        self.image_layers = nnx.List([tl.EncoderLayer(*layer_args, **kw) for _ in range(config.encoder_layers)])
        self.token_embed = nnx.Embed(int(config.vocab_size), d, rngs=rngs)
        self.token_positions = nnx.Param(jax.random.normal(rngs.params(), (int(config.text_length), d)) * 0.02)
        self.text_layers = nnx.List([tl.DecoderLayer(*layer_args, **kw) for _ in range(config.decoder_layers)])
        self.final_norm = tl.layer_norm(d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.lm_head = nnx.Linear(d, int(config.vocab_size), rngs=rngs)

    def encode_images(self, images: jax.Array) -> jax.Array:
        """uint8 pictures (B, H, W, 3), or int32 codes (B, image_length) for a model that reads code features ->
        (B, patches, d_model)."""
        b, g = images.shape[0], self.grid
        if self.reads == "pixels":
            p = self.patch_size
            x = images.astype(jnp.float32) / 127.5 - 1.0
            x = self.patch_embed(x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3))
        else:
            x = self.feature_embed(jax.lax.stop_gradient(self.code_features[...])[images])
            x = x + jax.nn.gelu(self.neighbourhood(x.reshape(b, g, g, -1))).reshape(b, g * g, -1)
        x = x + self.patch_positions[...]
        every_patch = jnp.ones((1, 1, 1, g * g), bool)
        for layer in self.image_layers:
            x = layer(x, every_patch, deterministic=True)
        return x

    def decode_text(self, patches: jax.Array, input_ids: jax.Array) -> jax.Array:
        """Next-token logits (B, T, vocab) for the caption prefixes `input_ids` (B, T) of encoded images."""
        h = self.token_embed(input_ids) + self.token_positions[: input_ids.shape[1]]
        self_mask = tl.causal_mask(input_ids.shape[1]) & tl.key_padding_mask(input_ids, self.pad_id)
        every_patch = jnp.ones((1, 1, 1, patches.shape[1]), bool)
        for layer in self.text_layers:
            h = layer(h, patches, self_mask, every_patch, deterministic=True)
        return self.lm_head(self.final_norm(h))

    def __call__(self, images: jax.Array, input_ids: jax.Array) -> jax.Array:
        return self.decode_text(self.encode_images(images), input_ids)

    def token_log_probs(self, patches: jax.Array, text_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced log p of each token after `<s>` in `text_ids` (B, T), given encoded images -> ((B, T-1)
        float32, (B, T-1) bool: which of them are caption tokens rather than padding)."""
        log_probs = jax.nn.log_softmax(self.decode_text(patches, text_ids[:, :-1]).astype(jnp.float32), axis=-1)
        targets = text_ids[:, 1:]
        return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0], targets != self.pad_id

    def caption_log_likelihood(self, patches: jax.Array, text_ids: jax.Array) -> jax.Array:
        """log p(caption | encoded image) (B,): summed over the caption's tokens (`</s>` included), padding left
        out."""
        token_log_probs, real = self.token_log_probs(patches, text_ids)
        return jnp.where(real, token_log_probs, 0.0).sum(axis=1)

    def log_likelihood(self, images: jax.Array, text_ids: jax.Array) -> jax.Array:
        """log p(caption | image) (B,) for images (as `encode_images` takes them) and their captions' ids (B, T)."""
        return self.caption_log_likelihood(self.encode_images(images), text_ids)
