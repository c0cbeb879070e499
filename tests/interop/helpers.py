"""Shared pieces of the interop tests: tiny dalle_jax models filled with given parameters, torch seeding."""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from flax import nnx

import dalle_jax  # noqa: F401  (sets the flax config the project relies on)
from dalle_jax.configs import seq2seq_common
from dalle_jax.models.dalle_bart import DalleBart
from dalle_jax.models.vqgan import VQGAN


def dalle_config(**fields) -> ml_collections.ConfigDict:
    cfg = seq2seq_common.base_config().model
    cfg.update(fields)
    return cfg


def _rngs(model_cls):
    # "rbg" keys compile much faster than threefry on CPU; the parameters are replaced anyway.
    key = jax.random.key(0, impl="rbg")
    return nnx.Rngs(params=key, dropout=key) if issubclass(model_cls, DalleBart) else nnx.Rngs(params=key)


def abstract_params(model_cls, cfg):
    """Shapes of the model's parameters, as a pure dict."""
    _, param_state, _ = _abstract_model(model_cls, cfg.to_json(sort_keys=True))
    return param_state.to_pure_dict()


@functools.lru_cache(maxsize=None)
def _abstract_model(model_cls, cfg_json: str):
    """(graphdef, parameter shapes, other state shapes), cached per config: tracing the initialisers takes seconds."""
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    return nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=_rngs(model_cls))), nnx.Param, ...)


def model_with(model_cls, cfg, params):
    """A model of `cfg` whose parameters are `params` (a pure dict of numpy arrays), merged into the abstract
    model (building a real one first would spend seconds on initialisers)."""
    graphdef, abstract_state, rest = _abstract_model(model_cls, cfg.to_json(sort_keys=True))
    param_state = jax.tree.map(lambda x: x, abstract_state)
    param_state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, param_state, jax.tree.map(_fresh_rng_leaf, rest))


def _fresh_rng_leaf(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        key = jax.random.key(0)
        return jax.random.split(key, leaf.shape) if leaf.shape else key
    return jnp.zeros(leaf.shape, leaf.dtype)


def random_params(model_cls, cfg, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(scale=0.2, size=s.shape).astype(np.float32),
                        abstract_params(model_cls, cfg))


def perturb_norms(module: torch.nn.Module, seed: int) -> None:
    """torch initialises norms to weight 1 / bias 0; random values make a swapped or dropped norm visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                sub.weight.copy_(1 + 0.2 * torch.randn(sub.weight.shape, generator=gen))
                sub.bias.copy_(0.2 * torch.randn(sub.bias.shape, generator=gen))


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


__all__ = ["DalleBart", "VQGAN"]


def tiny_vqgan_config(**overrides) -> ml_collections.ConfigDict:
    """Small enough for a fast test, with taming's 32 GroupNorm groups, attention and a channel change."""
    cfg = dict(resolution=16, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(8,), z_channels=8, embed_dim=8, codebook_size=64, beta=0.25,
               l2_normalize_codes=False, num_groups=32, dropout=0.0, dtype="float32", local_encoder=False)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _encode_decode(model, images, codes):
    _, indices, aux = model.encode(images)
    return aux["z_e"], indices, model.decode_code(codes)


_ENCODE_DECODE = nnx.jit(_encode_decode)  # one compilation serves every test of the same model and shapes


def vqgan_encode_decode(model, images: np.ndarray, codes: np.ndarray):
    """(z_e, indices, decoded codes) of our VQGAN, jitted; images NHWC in [-1, 1], codes (B, h, w)."""
    return jax.tree.map(np.asarray, _ENCODE_DECODE(model, jnp.asarray(images), jnp.asarray(codes)))
