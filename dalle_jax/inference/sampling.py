"""Sampling image tokens from DalleBart: classifier-free guidance, temperature, top-k and top-p filters.

The whole token loop runs inside one jit (a `lax.scan` over positions around the cached decoding step).
With guidance, each image's conditional and unconditional rows go through the model as one batch of 2B,
interleaved (row 2i conditional, 2i+1 unconditional) so that a batch sharded over devices keeps both rows of
an image on the same device and guidance needs no communication.

Image i's randomness depends only on its seed and its index: the key of step t is
`fold_in(fold_in(key(seed), index), t)`, so an image comes out the same whatever batch it is sampled in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dalle_jax import parallel
from dalle_jax.models import cached_decoding, dalle_bart, transformer_layers as tl
from dalle_jax.models.dalle_bart import TEXT_PAD_ID, DalleBart

TOKENS_ACTIVATION = ("batch",)
TEXT_ACTIVATION = ("batch", "length")
# Without the config's rules a mesh still splits the batch, and only the batch, over the data-parallel axes.
BATCH_ONLY_RULES = (("batch", parallel.BATCH_AXES),)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How the next token is drawn from the logits; applied in the order guidance, temperature, top-k, top-p."""
    temperature: float = 1.0  # > 0; divides the logits (below 1 sharpens, above 1 flattens)
    top_k: int | None = None  # keep only the k most likely codebook entries; None keeps all
    top_p: float = 1.0  # keep the smallest set of most likely entries whose probability reaches top_p; 1.0 = off
    cond_scale: float = 3.0  # guidance: uncond + cond_scale * (cond - uncond); 1.0 = conditional only
    # Images drawn per image returned: `TextToImage` keeps the one the model finds most likely given its prompt
    # (the highest log p(image | prompt)). `sample_image_tokens` itself draws one image per row.
    candidates: int = 1

    @classmethod
    def from_config(cls, sampling_cfg) -> "SamplingSettings":
        """From a run's `config.sampling` block (`top_k` 0 means no top-k filter)."""
        settings = cls(temperature=float(sampling_cfg.temperature), top_k=int(sampling_cfg.top_k) or None,
                       top_p=float(sampling_cfg.top_p), cond_scale=float(sampling_cfg.cond_scale),
                       candidates=int(sampling_cfg.candidates))
        settings.validate()
        return settings

    def with_overrides(self, **given) -> "SamplingSettings":
        """These settings with the given fields replaced (None keeps a field; `top_k=0` turns the filter off, as in a
        run's config.sampling), checked. Raises ValueError naming the first bad field."""
        given = {k: v for k, v in given.items() if v is not None}
        if given.get("top_k") == 0 and not isinstance(given["top_k"], bool):
            given["top_k"] = None
        settings = dataclasses.replace(self, **given)
        settings.validate()
        return settings

    @classmethod
    def overrides(cls, **given) -> dict:
        """The settings a command was given (None: not given), checked on their own before any run is loaded; they
        are returned as given (`top_k=0` included) for `with_overrides` on the run's defaults."""
        cls().with_overrides(**given)
        return {k: v for k, v in given.items() if v is not None}

    def validate(self) -> None:
        if not (isinstance(self.temperature, numbers.Real) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number > 0 (1.0 leaves the "
                             f"logits unchanged).")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral)
                                       or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1, or None to keep every token.")
        if not (isinstance(self.top_p, numbers.Real) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; 1.0 turns the nucleus filter off.")
        if not (isinstance(self.cond_scale, numbers.Real) and math.isfinite(self.cond_scale)
                and self.cond_scale >= 0):
            raise ValueError(f"cond_scale={self.cond_scale!r} must be a finite number >= 0 (1.0 = no guidance, "
                             f"0 = unconditional).")
        if (isinstance(self.candidates, bool) or not isinstance(self.candidates, numbers.Integral)
                or self.candidates < 1):
            raise ValueError(f"candidates={self.candidates!r} must be an integer >= 1 (1 keeps every image drawn).")

    @property
    def guided(self) -> bool:
        return self.cond_scale != 1.0


# ---- filters: pure functions on (..., vocab) float logits; a removed entry becomes -inf. Their settings may be
# traced values, so that one compiled loop serves every temperature, top_k, top_p and guidance scale. ----

def restrict_to_codebook(logits: jax.Array, image_vocab_size: int) -> jax.Array:
    """Removes every column that is not a codebook index (the start token and the padding)."""
    return jnp.where(jnp.arange(logits.shape[-1]) < image_vocab_size, logits, -jnp.inf)


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    return logits / temperature


def truncate(logits: jax.Array, top_k, top_p) -> jax.Array:
    """Top-k, then top-p over what top-k kept. Top-k keeps the k largest logits (more where the k-th is tied);
    top-p keeps the smallest set of largest logits whose probability among the k largest reaches p (never empty;
    ties with its smallest member kept too); p >= 1 keeps everything. A Python int `top_k` takes the k largest by
    a partial sort (`lax.top_k`), a traced one sorts the whole row. The sampler draws with `draw_top_k` when it has
    a top-k (see there), and truncates with this for top-p alone."""
    vocab = logits.shape[-1]
    if isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool):
        descending = jax.lax.top_k(logits, min(max(int(top_k), 1), vocab))[0]
        kth_largest = descending[..., -1:]
    else:
        descending = -jnp.sort(-logits, axis=-1)
        k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, vocab)
        kth_largest = jax.lax.dynamic_index_in_dim(descending, k - 1, axis=-1, keepdims=True)
        descending = jnp.where(jnp.arange(vocab) < k, descending, -jnp.inf)  # the k largest; still sorted
    smallest_in_nucleus = _smallest_in_nucleus(descending, top_p)
    return jnp.where(logits >= jnp.maximum(kth_largest, smallest_in_nucleus), logits, -jnp.inf)


def _smallest_in_nucleus(descending: jax.Array, top_p) -> jax.Array:
    """(..., n) logits sorted largest first -> (..., 1): the smallest logit of the top-p nucleus among them."""
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    in_nucleus = (mass_before < top_p) | (top_p >= 1.0)
    return jnp.min(jnp.where(in_nucleus, descending, jnp.inf), axis=-1, keepdims=True)


def draw_top_k(keys: jax.Array, logits: jax.Array, top_k: int, top_p=None) -> jax.Array:
    """One draw per row among its `top_k` largest logits (ties at the k-th go to the lower id), after top-p over
    them (None: off): the distribution of `draw(keys, truncate(logits, top_k, top_p))` without ties, drawn in the
    (B, k) space. The sampler's path: XLA's CPU compiler turns a top-k of which only the k-th value is used into
    a sort of the whole row (42 ms a step for 250 rows of 1,088 codes, against 1 ms), and a draw over k entries
    needs k random numbers instead of one per code."""
    values, ids = jax.lax.top_k(logits, min(int(top_k), logits.shape[-1]))
    if top_p is not None:
        values = jnp.where(values >= _smallest_in_nucleus(values, top_p), values, -jnp.inf)
    choice = draw(keys, values)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def top_k_filter(logits: jax.Array, k) -> jax.Array:
    return truncate(logits, k, 1.0)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
    return truncate(logits, logits.shape[-1], p)


def filter_logits(logits: jax.Array, image_vocab_size: int, temperature) -> jax.Array:
    """Codebook restriction, then temperature: the logits top-k and top-p then truncate."""
    return apply_temperature(restrict_to_codebook(logits, image_vocab_size), temperature)


def guide(cond_logits: jax.Array, uncond_logits: jax.Array, cond_scale: float) -> jax.Array:
    """Classifier-free guidance: moves the logits away from the unconditional ones by `cond_scale`."""
    return uncond_logits + cond_scale * (cond_logits - uncond_logits)


def draw(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One categorical draw per row: keys (B,) typed keys, logits (B, vocab) -> (B,) int32."""
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def image_keys(seeds: jax.Array, indices: jax.Array) -> jax.Array:
    """(B,) seeds and (B,) image indices -> (B,) typed keys, one stream per image."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, indices)


# ---- the loop ----

def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """(B, ...) and (B, ...) -> (2B, ...) with rows a0, b0, a1, b1, ..."""
    return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


def next_token_logits(model, tokens: jax.Array, position: jax.Array, cache: cached_decoding.KeyValues,
                      cross_kv: cached_decoding.KeyValues, cross_mask: jax.Array, *, guided: bool,
                      cond_scale=1.0) -> tuple[jax.Array, jax.Array, cached_decoding.KeyValues]:
    """The (B, vocab) logits of position `position` given each image's previous token `tokens` (B,), guided, and
    the conditional ones alone. When `guided`, the cache and prompt rows are interleaved conditional/unconditional
    (2B rows)."""
    if not guided:
        logits, cache = cached_decoding.decode_step(model, tokens, position, cache, cross_kv, cross_mask)
        return logits, logits, cache
    logits, cache = cached_decoding.decode_step(
        model, jnp.repeat(tokens, 2), position, cache, cross_kv, cross_mask)
    pairs = logits.reshape(tokens.shape[0], 2, logits.shape[-1])
    return guide(pairs[:, 0], pairs[:, 1], cond_scale), pairs[:, 0], cache


def token_log_probs(logits: jax.Array, tokens: jax.Array, image_vocab_size: int) -> jax.Array:
    """log p(token) of each row's (B,) token under its (B, vocab) logits, softmax over the codebook only."""
    log_probs = jax.nn.log_softmax(restrict_to_codebook(logits.astype(jnp.float32), image_vocab_size), axis=-1)
    return jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def _row_products_pay(rows: int, mesh: Mesh | None) -> bool:
    """Whether the decoding steps should use `cached_decoding.use_row_products`: on CPU devices, for few rows each."""
    devices = jax.devices() if mesh is None else list(mesh.devices.flat)
    per_device = rows if mesh is None else rows // parallel.batch_parallelism(mesh)
    return devices[0].platform == "cpu" and per_device <= cached_decoding.ROW_PRODUCT_MAX_ROWS


def with_row_products(graphdef: nnx.GraphDef, state: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
    """The same model with the kernels its decoding steps multiply by stored transposed
    (`cached_decoding.use_row_products`), for sampling many times on the CPU: `sample_image_tokens` otherwise
    transposes them in every call (seconds at DALL·E mini's size). The given state is left as it is."""
    model = nnx.merge(graphdef, state, copy=True)
    cached_decoding.use_row_products(model)
    return nnx.split(model)


def unrolled_model(model_config: ml_collections.ConfigDict, params: dict) -> DalleBart:
    """The DalleBart of `model_config` and `params` (pure dict), with scanned layer stacks unrolled
    (`dalle_bart.unrolled_equivalent`): its decoding steps then keep one cache array per layer and update it in
    place, where a scanned stack slices each layer's cache out of the stack and writes it back at every step, which
    for hundreds of rows costs more than the step's matrix products on a CPU."""
    cfg, params = dalle_bart.unrolled_equivalent(model_config, params)
    abstract = nnx.eval_shape(lambda: DalleBart(cfg, rngs=nnx.Rngs(params=0, dropout=0)))
    graphdef, _, rng_state = nnx.split(abstract, nnx.Param, ...)
    return nnx.merge(graphdef, params, tl.fresh_rng_state(rng_state, jax.random.key(0)))


@functools.partial(jax.jit, static_argnames=("graphdef", "guided", "top_k", "mesh", "rules", "with_scores"))
def _sample(graphdef, state, text_ids, uncond_text_ids, seeds, indices, knobs: dict, *, guided: bool,
            top_k: int | None, mesh: Mesh | None, rules, with_scores: bool = False) -> tuple[jax.Array, jax.Array]:
    with parallel.activation_sharding(mesh, rules) if mesh is not None else contextlib.nullcontext():
        model = nnx.merge(graphdef, state)
        batch = text_ids.shape[0]
        prompts = interleave(text_ids, uncond_text_ids) if guided else text_ids
        cross_kv, cross_mask = cached_decoding.encode_prompt(model, parallel.constrain(prompts, TEXT_ACTIVATION))
        cache = cached_decoding.init_cache(model, prompts.shape[0], cross_kv.dtype)
        keys = image_keys(seeds, indices)
        if _row_products_pay(prompts.shape[0], mesh):
            cached_decoding.use_row_products(model)
        step_graphdef, step_state = nnx.split(model)

        def step(carry, position):
            tokens, cache, scores = carry
            # The loop body is its own trace: it needs Variables of its own, not the ones merged outside it.
            step_model = nnx.merge(step_graphdef, step_state, copy=True)
            logits, cond_logits, cache = next_token_logits(step_model, tokens, position, cache, cross_kv,
                                                           cross_mask, guided=guided, cond_scale=knobs["cond_scale"])
            logits = filter_logits(logits, model.image_vocab_size, knobs["temperature"])
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, position)
            if top_k is not None:
                tokens = draw_top_k(step_keys, logits, top_k, knobs["top_p"])
            elif knobs["top_p"] is not None:
                tokens = draw(step_keys, truncate(logits, logits.shape[-1], knobs["top_p"]))
            else:
                tokens = draw(step_keys, logits)
            tokens = parallel.constrain(tokens, TOKENS_ACTIVATION)
            if with_scores:
                scores = scores + token_log_probs(cond_logits, tokens, model.image_vocab_size)
            return (tokens, cache, scores), tokens

        start = parallel.constrain(jnp.full((batch,), model.start_token, jnp.int32), TOKENS_ACTIVATION)
        scores = parallel.constrain(jnp.zeros((batch,), jnp.float32), TOKENS_ACTIVATION)
        (_, _, scores), tokens = jax.lax.scan(step, (start, cache, scores),
                                              jnp.arange(model.image_length, dtype=jnp.int32))
        return parallel.constrain(tokens.T, TEXT_ACTIVATION), scores


def _knobs(settings: SamplingSettings) -> dict:
    """The settings passed as arrays, so that changing them does not recompile; whether top-p runs is structural,
    and top_k is a static argument of its own (a partial sort needs its size)."""
    return dict(temperature=np.float32(settings.temperature), cond_scale=np.float32(settings.cond_scale),
                top_p=np.float32(settings.top_p) if settings.top_p < 1.0 else None)


def _as_id_array(name: str, ids, batch: int | None = None) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or 0 in ids.shape:
        raise ValueError(f"{name} must be integer token ids of shape (batch, length), both at least 1; got "
                         f"{ids.dtype} {ids.shape}.")
    if batch is not None and ids.shape[0] not in (1, batch):
        raise ValueError(f"{name} has {ids.shape[0]} rows; give one row (shared by all images) or {batch}.")
    return ids.astype(np.int32)


def _pad_to(ids: np.ndarray, length: int) -> np.ndarray:
    return np.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=TEXT_PAD_ID)


def _per_image(name: str, values, batch: int) -> np.ndarray:
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {values.dtype}.")
    if values.ndim == 0:
        values = np.full((batch,), values)
    if values.shape != (batch,):
        raise ValueError(f"{name} must be one integer or one per image (shape ({batch},)), got shape {values.shape}.")
    if values.min() < 0 or values.max() >= 2 ** 32:
        raise ValueError(f"{name} must lie in [0, 2**32), got values in [{values.min()}, {values.max()}].")
    return values.astype(np.uint32)


def _hashable_rules(rules) -> tuple:
    """The rules as nested tuples, so that they can key the compilation cache."""
    return tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes)) for name, axes in rules)


def sample_image_tokens(graphdef: nnx.GraphDef, state: nnx.State, text_ids, uncond_text_ids, seeds, indices,
                        settings: SamplingSettings, *, mesh: Mesh | None = None, sharding_rules=None,
                        with_scores: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Samples one image's tokens per prompt row (`settings.candidates` is not used here).

    graphdef, state: `nnx.split(model)` of a DalleBart (all of its state, so it merges whole). On a mesh the
      state must already be placed on that mesh's devices (replicated, or by `parallel.state_shardings`).
    text_ids: (B, Lt) BART text ids, `<pad>`-padded (a single prompt may be given as (Lt,)).
    uncond_text_ids: the prompt of the unconditional rows, usually the empty caption: (Lt',) or (1, Lt') for
      all images, or (B, Lt'). Unused (and may be None) when `settings.cond_scale == 1`.
    seeds, indices: each one integer or one per image, in [0, 2**32); image b's randomness derives from
      `(seeds[b], indices[b])` alone.
    mesh: the batch is split over its data-parallel axes (B must be divisible by data x fsdp);
      `sharding_rules` (the config's logical-axis rules) then also place the model's activations.
    Returns (B, image_length) int32 codebook indices; with `with_scores`, also (B,) float32 log p(tokens | prompt)
    under the conditional model alone (no guidance, temperature or filters: what teacher forcing would give).
    """
    settings.validate()
    text_ids = _as_id_array("text_ids", text_ids)
    batch = text_ids.shape[0]
    if settings.guided:
        if uncond_text_ids is None:
            raise ValueError(f"cond_scale={settings.cond_scale} needs uncond_text_ids (usually the empty caption); "
                             f"pass them, or set cond_scale=1.0 to sample without guidance.")
        uncond = _as_id_array("uncond_text_ids", uncond_text_ids, batch)
        length = max(text_ids.shape[1], uncond.shape[1])
        text_ids = _pad_to(text_ids, length)
        uncond_text_ids = np.broadcast_to(_pad_to(uncond, length), text_ids.shape)
    else:
        uncond_text_ids = None  # never reaches the model
    seeds, indices = _per_image("seeds", seeds, batch), _per_image("indices", indices, batch)
    rules = None
    if mesh is not None:
        parallel.check_global_batch(batch, mesh, field="the number of prompts")
        rules = _hashable_rules(sharding_rules or BATCH_ONLY_RULES)
        text_ids, uncond_text_ids, seeds, indices = jax.device_put(
            (text_ids, uncond_text_ids, seeds, indices), parallel.batch_sharding(mesh))
    tokens, scores = _sample(graphdef, state, text_ids, uncond_text_ids, seeds, indices, _knobs(settings),
                             guided=settings.guided, top_k=settings.top_k, mesh=mesh, rules=rules,
                             with_scores=with_scores)
    return (tokens, scores) if with_scores else tokens
