"""DalleBart whose decoder embeds and scores image tokens by fixed per-code features (`shapes/code_features.py`).

With `config.model.code_features` (the features' width; 0: the plain layout) the decoder embeds its image-token
inputs from the feature rows alone and adds `(h @ W) @ features^T` to its output logits, so what it learns of a
shape's outline and of a colour holds for every code that shows them. Both are linear in the features, so
`dense_equivalent` turns such a model into the plain DalleBart layout (an embedding table and an output kernel),
which is how it is sampled and exported.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle_jax.models import dalle_bart, transformer_layers as tl

CONFIG_FIELDS = dalle_bart.CONFIG_FIELDS + ("code_features",)


def features_per_column(features: jax.Array, columns: int) -> jax.Array:
    """(image_vocab_size + 1, width) code features -> (columns, width): zero rows for the output head's padding."""
    return jnp.zeros((columns, features.shape[1]), features.dtype).at[:features.shape[0]].set(features)


class CodeFeaturesDecoder(dalle_bart.Decoder):

    def init_image_token_embedding(self, cfg: ml_collections.ConfigDict, kw: dict) -> None:
        self.code_features_width = int(cfg.code_features)
        if not self.code_features_width:
            return super().init_image_token_embedding(cfg, kw)
        # Filled from the training images by the trainer, then never trained (see `image_token_features`).
        self.code_features = nnx.Param(jnp.zeros((cfg.image_vocab_size + 1, self.code_features_width), jnp.float32))
        self.embed_features = nnx.Linear(  # initialised like the embedding tables it stands for
            self.code_features_width, cfg.d_model, use_bias=False, dtype=kw["dtype"], param_dtype=kw["param_dtype"],
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed")), rngs=kw["rngs"])
        self.head_features = tl.dense(cfg.d_model, self.code_features_width, ("embed", None), **kw)

    def image_token_features(self) -> jax.Array:
        """(image_vocab_size + 1, width) fixed code features; gradients never reach them."""
        return jax.lax.stop_gradient(self.code_features[...])

    def embed_image_tokens(self, ids: jax.Array) -> jax.Array:
        if not self.code_features_width:
            return super().embed_image_tokens(ids)
        return self.embed_features(self.image_token_features()[ids])

    def head_logits(self, x: jax.Array) -> jax.Array:
        logits = super().head_logits(x)
        if not self.code_features_width:
            return logits
        padded = features_per_column(self.image_token_features(), self.padded_vocab_size)
        return logits + self.head_features(x).astype(jnp.float32) @ padded.T


class CodeFeaturesBart(dalle_bart.DalleBart):
    decoder_class = CodeFeaturesDecoder

    @classmethod
    def validate_config(cls, cfg: ml_collections.ConfigDict) -> None:
        dalle_bart.validate_config(cfg, CONFIG_FIELDS)
        if int(cfg.code_features) < 0:
            raise ValueError(f"config.model.code_features={cfg.code_features} must be 0 (off) or the width of the "
                             "codes' appearance features.")

    @staticmethod
    def dense_equivalent(cfg: ml_collections.ConfigDict, params: dict) -> tuple[ml_collections.ConfigDict, dict]:
        """A model config with `code_features` and its parameters (pure dict) -> the plain DalleBart config and
        parameters that compute the same logits: embedding table = features @ embed kernel, output kernel += head
        kernel @ features^T."""
        dense_cfg = ml_collections.ConfigDict({k: v for k, v in cfg.to_dict().items() if k != "code_features"})
        if not int(cfg.code_features):
            return dense_cfg, params
        decoder = dict(params["decoder"])
        features = jnp.asarray(decoder.pop("code_features"), jnp.float32)
        embed_kernel = jnp.asarray(decoder.pop("embed_features")["kernel"], jnp.float32)
        head_kernel = jnp.asarray(decoder.pop("head_features")["kernel"], jnp.float32)
        lm_kernel = decoder["lm_head"]["kernel"]
        padded = features_per_column(features, lm_kernel.shape[1])
        decoder["embed_tokens"] = {"embedding": (features @ embed_kernel).astype(lm_kernel.dtype)}
        decoder["lm_head"] = {"kernel": (jnp.asarray(lm_kernel, jnp.float32) + head_kernel @ padded.T)
                              .astype(lm_kernel.dtype)}
        return dense_cfg, dict(params, decoder=decoder)
