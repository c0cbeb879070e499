"""The Python API: a trained seq2seq work directory, loaded once, turns prompts into images.

    pipe = TextToImage.from_workdir("runs/dalle")
    samples = pipe(["a small red circle in the top left", ""], num_images=4, seed=0, cond_scale=3.0)
    samples.images     # uint8 (prompts, num_images, H, W, 3); the empty prompt samples unconditionally
    samples.image_ids  # the sampled codes, (prompts, num_images, image_length)

Image i of a request (prompt i // num_images) draws its randomness from (seed, i) alone, so it comes out the
same whatever the batch size and the number of devices. With `candidates=K`, image i is the one of K drawn from
(seed, i*K), ..., (seed, i*K + K-1) that scores highest: without a reranker the seq2seq model's log p(image |
prompt); with one (a caption model trained by the shapes_captioner recipe) its log p(prompt | image), which reads
the picture (its codes' appearance, or its decoded pixels) and so tells a right one from a wrong one the seq2seq
model finds just as likely. A reranker that finished training for the run registered itself there, and is used
unless `reranker_workdir=""` turns it off. K=1 draws image i from (seed, i) itself. Requests are cut into batches of
`batch_size` draws (batch_size // K images, at least one), each split over the mesh's data-parallel axes; the last
batch is padded to the size of the others (so one compilation serves them all) and the padding dropped.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import numbers
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dalle_jax.data import image_grid
from dalle_jax import parallel, storage
from dalle_jax.inference import sampling
from dalle_jax import runs
from dalle_jax.data import token_records
from dalle_jax.models import captioner as captioner_lib
from dalle_jax.inference.sampling import SamplingSettings

DEFAULT_BATCH_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Samples:
    """The images of one request, with everything needed to reproduce or re-decode them."""
    prompts: tuple[str, ...]
    images: np.ndarray  # uint8 (prompts, num_images, H, W, 3)
    image_ids: np.ndarray  # int32 (prompts, num_images, image_length): codebook indices, row-major over the grid
    text_ids: np.ndarray  # int32 (prompts, text_length): each prompt's ids, `<pad>`-padded
    uncond_text_ids: np.ndarray | None  # int32 (text_length,): the empty caption; None without guidance
    seed: int
    settings: SamplingSettings
    truncated: tuple[bool, ...]  # whether each prompt lost tokens to fit text_length
    scores: np.ndarray  # float32 (prompts, num_images): the kept draw's score, as `scorer` says
    draws: np.ndarray  # int64 (prompts, num_images): the index each image was drawn from, with `seed`
    # "seq2seq": log p(image_ids | prompt) under the conditional model; "reranker": log p(prompt | image) under the
    # caption model that picked the draw.
    scorer: str = "seq2seq"
    reranker: dict | None = None  # {"workdir", "step"} of the caption model, when it was the scorer

    @property
    def num_images(self) -> int:
        return self.images.shape[1]

    @property
    def indices(self) -> np.ndarray:
        """(prompts, num_images): each image's index i (with `seed`, it determines the image; `draws` holds the
        index of the draw that was kept)."""
        return np.arange(self.images.shape[0] * self.num_images).reshape(self.images.shape[:2])

    def grid(self) -> np.ndarray:
        """One uint8 picture: a row of `num_images` images per prompt."""
        return image_grid.image_grid(self.images.reshape(-1, *self.images.shape[2:]), columns=self.num_images)

    def records(self) -> list[dict]:
        """One JSON-ready dict per image, in index order."""
        settings = dataclasses.asdict(self.settings)
        uncond = None if self.uncond_text_ids is None else self.uncond_text_ids.tolist()
        return [dict(prompt=self.prompts[p], seed=self.seed, index=int(self.indices[p, j]), **settings,
                     text_ids=self.text_ids[p].tolist(), uncond_text_ids=uncond,
                     image_ids=self.image_ids[p, j].tolist(), score=float(self.scores[p, j]),
                     scorer=self.scorer, reranker=self.reranker, draw=int(self.draws[p, j]))
                for p in range(len(self.prompts)) for j in range(self.num_images)]


class TextToImage:
    """A seq2seq model and its VQGAN (and optionally a reranker), restored onto one mesh; call it with prompts to
    get images."""

    def __init__(self, seq2seq: runs.LoadedSeq2Seq, vqgan: runs.LoadedVQGAN, mesh: Mesh, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, default_settings: SamplingSettings | None = None,
                 reranker: runs.LoadedReranker | None = None):
        _check_compatible(seq2seq, vqgan)
        _warn_if_trained_on_another_vqgan(seq2seq, vqgan)
        if reranker is not None:
            _check_reranker(reranker.config, reranker.workdir, seq2seq.config, seq2seq.workdir,
                            int(vqgan.config.model.resolution))
        self.seq2seq, self.vqgan, self.mesh, self.reranker = seq2seq, vqgan, mesh, reranker
        self.batch_size = _positive_int("batch_size", batch_size)
        self.default_settings = (SamplingSettings.from_config(seq2seq.config.sampling)
                                 if default_settings is None else default_settings)
        self.default_settings.validate()
        if all(device.platform == "cpu" for device in mesh.devices.flat):
            model = sampling.unrolled_model(seq2seq.config.model, seq2seq.params)
            self._graphdef, self._state = sampling.with_row_products(*nnx.split(model))
        else:
            self._graphdef, self._state = nnx.split(seq2seq.model())
        self._decode = jax.jit(functools.partial(runs.decode_uint8, vqgan))
        self._rerank = None if reranker is None else jax.jit(
            functools.partial(_rerank, vqgan, reranker), static_argnums=4)

    @classmethod
    def from_workdir(cls, workdir: str, *, mesh: Mesh | None = None, step: int | None = None,
                     vqgan_workdir: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     default_settings: SamplingSettings | None = None,
                     reranker_workdir: str | None = None) -> "TextToImage":
        """Loads the seq2seq run in `workdir` (its newest checkpoint, or `step`) and the VQGAN it was trained on
        (`config.vqgan_workdir`, unless `vqgan_workdir` names it), both onto `mesh` (default: every local device
        on the batch axes), and a caption model to pick among candidates: the one in `reranker_workdir`, none when
        it is "", and by default (None) the one registered for the run, if any (`runs.registered_reranker`).
        `default_settings` (default: the run's `config.sampling`) fill in what a call leaves out."""
        batch_size = _positive_int("batch_size", batch_size)
        if default_settings is not None:
            default_settings.validate()
        config = runs.read_config(workdir, "seq2seq")
        runs.checkpoint_step(workdir, "seq2seq")
        vqgan_dir = runs.vqgan_workdir_of(workdir, config, vqgan_workdir)
        given, reranker_workdir = reranker_workdir, runs.reranker_workdir_for(workdir, reranker_workdir)
        if given == "":
            logging.info("No reranker for %s: turned off (reranker_workdir is empty).", workdir)
        elif reranker_workdir is None:
            logging.info("No reranker for %s: none is registered in its %s.", workdir, runs.RERANKER_FILE)
        else:
            logging.info("Reranker for %s: %s (%s).", workdir, reranker_workdir,
                         "given" if given else f"registered in its {runs.RERANKER_FILE}")
        if reranker_workdir is not None:  # from the configs alone, before any checkpoint is restored
            try:
                _check_reranker(runs.read_config(reranker_workdir, "captioner"), reranker_workdir, config, workdir,
                                int(runs.load_config(vqgan_dir).model.resolution))
            except (ValueError, FileNotFoundError) as e:
                if given is not None:
                    raise
                raise type(e)(f"{e} (It is the reranker registered in {storage.join(workdir, runs.RERANKER_FILE)}; "
                              'reranker_workdir="" (--reranker_workdir="") samples without it.)') from e
        mesh = mesh if mesh is not None else runs.default_mesh()
        seq2seq = runs.load_seq2seq(workdir, mesh, step=step)
        vqgan = runs.load_vqgan(vqgan_dir, mesh)
        reranker = None if reranker_workdir is None else runs.load_reranker(reranker_workdir, mesh)
        return cls(seq2seq, vqgan, mesh, batch_size=batch_size, default_settings=default_settings,
                   reranker=reranker)

    @property
    def text_length(self) -> int:
        return int(self.seq2seq.config.model.text_length)

    @property
    def image_size(self) -> int:
        return int(self.vqgan.config.model.resolution)

    def sampling_settings(self, *, temperature: float | None = None, top_k: int | None = None,
                          top_p: float | None = None, cond_scale: float | None = None,
                          candidates: int | None = None) -> SamplingSettings:
        """`default_settings` with the given fields replaced (None keeps the default; `top_k=0` turns the filter off,
        as in a run's config.sampling), checked."""
        return self.default_settings.with_overrides(temperature=temperature, top_k=top_k, top_p=top_p,
                                                    cond_scale=cond_scale, candidates=candidates)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, tuple[bool, ...]]:
        """(prompts, text_length) ids of the normalised prompts, warning about each one that was truncated."""
        rows, truncated = [], []
        for prompt in prompts:
            ids, cut = self.seq2seq.tokenizer.encode_with_truncation(prompt, self.text_length)
            if cut:
                warnings.warn(f"The prompt {prompt!r} is longer than the model's text_length={self.text_length} "
                              f"tokens; its end was dropped. Shorten it to keep every word.", stacklevel=3)
            rows.append(ids)
            truncated.append(cut)
        return np.stack(rows).astype(np.int32), tuple(truncated)

    def __call__(self, prompts: str | Sequence[str], num_images: int = 1, *, seed: int = 0,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 cond_scale: float | None = None, candidates: int | None = None, batch_size: int | None = None,
                 progress: bool = False) -> Samples:
        """Samples `num_images` images per prompt. Settings left as None take `default_settings`' value;
        `cond_scale=1` samples without guidance, `candidates=K` keeps the best-scoring of K draws per image,
        `progress` shows a bar over batches."""
        prompts = _check_prompts(prompts)
        num_images = _positive_int("num_images", num_images)
        batch_size = _positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        seed = _check_seed(seed)
        settings = self.sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p, cond_scale=cond_scale,
                                          candidates=candidates)
        text_ids, truncated = self.encode_prompts(prompts)
        codes, images, scores, draws = self.generate(np.repeat(text_ids, num_images, axis=0), seed, settings,
                                                     batch_size=batch_size, progress=progress)
        shape = (len(prompts), num_images)
        return Samples(prompts=prompts, images=images.reshape(*shape, *images.shape[1:]),
                       image_ids=codes.reshape(*shape, codes.shape[-1]), text_ids=text_ids,
                       uncond_text_ids=self.seq2seq.empty_text_ids if settings.guided else None,
                       seed=seed, settings=settings, truncated=truncated, scores=scores.reshape(shape),
                       draws=draws.reshape(shape), scorer=self.scorer(settings),
                       reranker=self.reranker_record(settings))

    def scorer(self, settings: SamplingSettings) -> str:
        """What scores the draws under `settings`: "reranker" when a caption model picks among candidates, else
        "seq2seq"."""
        return "reranker" if self.reranker is not None and settings.candidates > 1 else "seq2seq"

    def reranker_record(self, settings: SamplingSettings) -> dict | None:
        """{"workdir", "step"} of the caption model that scores the draws under `settings`; None when it does not."""
        if self.scorer(settings) != "reranker":
            return None
        return dict(workdir=self.reranker.workdir, step=self.reranker.step)

    def describe_picker(self, settings: SamplingSettings) -> str:
        """What keeps each image under `settings`, for logs."""
        if settings.candidates == 1:
            return "one draw per image (candidates=1): nothing to pick"
        if self.scorer(settings) == "reranker":
            return (f"the reranker in {self.reranker.workdir} (step {self.reranker.step}) picks the best of "
                    f"{settings.candidates} candidates per image")
        return f"the seq2seq model's likelihood picks the best of {settings.candidates} candidates per image"

    def generate(self, text_ids: np.ndarray, seed, settings: SamplingSettings, *, indices=None,
                 batch_size: int | None = None, progress: bool = False) -> tuple[np.ndarray, ...]:
        """Row i of `text_ids` (N, text_length) -> image i, the best-scoring of the K = `settings.candidates` draws
        from (seed, i*K + c), c < K: returns the codes (N, image_length) int32, the images (N, H, W, 3) uint8, the
        scores (N,) float32 (as `scorer(settings)` says), and the index i*K + c each image was drawn from (N,)
        int64. `seed` may also be one seed per row and `indices` (default 0..N-1) each row's own i, so that rows of
        several requests sampled together come out as each request alone would."""
        settings.validate()
        text_ids = np.asarray(text_ids)
        if text_ids.ndim != 2 or text_ids.shape[0] == 0 or text_ids.shape[1] != self.text_length:
            raise ValueError(f"text_ids must have shape (N >= 1, text_length={self.text_length}), got "
                             f"{text_ids.shape}; encode prompts with encode_prompts().")
        total, candidates = len(text_ids), settings.candidates
        row_seeds = _per_row("seed", seed, total)
        row_indices = _per_row("indices", np.arange(total) if indices is None else indices, total)
        reranked = self.scorer(settings) == "reranker"
        ways = parallel.batch_parallelism(self.mesh)
        # Images per call: a batch of `batch_size` draws holds batch_size // candidates images (at least one).
        batch = -(-min(max((batch_size or self.batch_size) // candidates, 1), total) // ways) * ways
        codes, images, scores, draws = [], [], [], []
        bar = tqdm(total=-(-total // batch), desc="sampling", unit="batch", disable=not progress)

        def fetch(pending):
            tokens, pixels, best_scores, best_draws, rows = pending
            codes.append(np.asarray(jax.device_get(tokens))[:rows])
            images.append(np.asarray(jax.device_get(pixels))[:rows])
            scores.append(np.asarray(jax.device_get(best_scores))[:rows])
            draws.append(np.asarray(jax.device_get(best_draws), np.int64)[:rows])
            bar.update(1)

        pending = None
        for start in range(0, total, batch):
            rows = min(batch, total - start)
            ids = np.tile(self.seq2seq.empty_text_ids, (batch, 1))
            ids[:rows] = text_ids[start:start + rows]
            indices, seeds = np.zeros((batch,), np.int64), np.zeros((batch,), np.int64)
            indices[:rows] = row_indices[start:start + rows]
            seeds[:rows] = row_seeds[start:start + rows]
            drawn_ids = np.repeat(ids, candidates, axis=0)
            sampled = sampling.sample_image_tokens(
                self._graphdef, self._state, drawn_ids, self.seq2seq.empty_text_ids, np.repeat(seeds, candidates),
                (indices[:, None] * candidates + np.arange(candidates)).reshape(-1), settings,
                mesh=self.mesh, sharding_rules=self.seq2seq.config.sharding_rules, with_scores=not reranked)
            if reranked:
                tokens, pixels, drawn_scores, chosen = self._rerank(self.vqgan.params, self.reranker.params, sampled,
                                                                    drawn_ids, candidates)
            else:
                tokens, drawn_scores = sampled
                chosen = 0
                if candidates > 1:
                    tokens, drawn_scores, chosen = _likeliest(tokens, drawn_scores, candidates)
                pixels = self._decode(self.vqgan.params, tokens)
            # Dispatch this batch before waiting for the previous one, so the device never idles on the host.
            if pending is not None:
                fetch(pending)
            pending = (tokens, pixels, drawn_scores, indices * candidates + chosen, rows)
        fetch(pending)
        bar.close()
        return tuple(np.concatenate(parts) for parts in (codes, images, scores, draws))

    def decode(self, image_ids) -> np.ndarray:
        """(N, image_length) codes -> uint8 (N, H, W, 3) images, through the VQGAN decoder."""
        image_ids = np.asarray(image_ids, np.int32)
        if image_ids.ndim != 2 or image_ids.shape[1] != self.vqgan.grid_size ** 2:
            raise ValueError(f"image_ids must have shape (N, {self.vqgan.grid_size ** 2}), got {image_ids.shape}.")
        return np.asarray(jax.device_get(self._decode(self.vqgan.params, image_ids)))


@functools.partial(jax.jit, static_argnums=2)
def _likeliest(tokens: jax.Array, scores: jax.Array, candidates: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(N*K, L) tokens and (N*K,) scores, K consecutive rows per image -> the (N, L) rows of highest score, their
    scores, and which of its K rows each is."""
    scores = scores.reshape(-1, candidates)
    best = jnp.argmax(scores, axis=1)
    tokens = tokens.reshape(scores.shape[0], candidates, -1)
    return (jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0],
            jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0], best)


def _rerank(vqgan: runs.LoadedVQGAN, reranker: runs.LoadedReranker, vqgan_params, captioner_params, tokens: jax.Array,
            text_ids: jax.Array, candidates: int) -> tuple[jax.Array, ...]:
    """Keeps, of every image's draws (N*K rows, K consecutive per image), the one whose picture the caption model
    finds its prompt likeliest for: (N, L) codes, (N, H, W, 3) pixels, (N,) scores, (N,) which. A model that reads
    code features scores the codes and only the kept draws are decoded; one that reads pixels needs every draw
    decoded."""
    model = reranker.model(captioner_params)
    if captioner_lib.reads(reranker.config.model) == "code_features":
        tokens, scores, best = _likeliest(tokens, model.log_likelihood(tokens, jnp.asarray(text_ids)), candidates)
        return tokens, runs.decode_uint8(vqgan, vqgan_params, tokens), scores, best
    pixels = runs.decode_uint8(vqgan, vqgan_params, tokens)
    scores = model.log_likelihood(pixels, jnp.asarray(text_ids))
    tokens, scores, best = _likeliest(tokens, scores, candidates)
    pixels = pixels.reshape(scores.shape[0], candidates, *pixels.shape[1:])
    return tokens, jnp.take_along_axis(pixels, best[:, None, None, None, None], axis=1)[:, 0], scores, best


def _check_compatible(seq2seq: runs.LoadedSeq2Seq, vqgan: runs.LoadedVQGAN) -> None:
    model = seq2seq.config.model
    if vqgan.grid_size ** 2 != model.image_length or vqgan.codebook_size > model.image_vocab_size:
        raise ValueError(
            f"The VQGAN in {vqgan.workdir} ({vqgan.grid_size}x{vqgan.grid_size} codes from {vqgan.codebook_size}) "
            f"cannot decode the model in {seq2seq.workdir} (image_length={model.image_length}, "
            f"image_vocab_size={model.image_vocab_size}). Use the VQGAN the model was trained on.")
    if vqgan.codebook_size < model.image_vocab_size:
        # The trainer allows this (those ids are never targets), so the model gives them little probability.
        warnings.warn(f"The model in {seq2seq.workdir} has image_vocab_size={model.image_vocab_size} but its VQGAN "
                      f"has {vqgan.codebook_size} codes; an image with a sampled id of {vqgan.codebook_size} or more "
                      "decodes to garbage.", stacklevel=3)


def _check_reranker(config, reranker_workdir: str, seq2seq_config, seq2seq_workdir: str, image_size: int) -> None:
    """The caption model (its `config`) must read the prompts' ids as the seq2seq run writes them, and pictures of
    the VQGAN's `image_size` (or, reading codes, as many codes from a codebook as large as the run draws)."""
    if config.get("tokenizer_sha256") != runs.tokenizer_fingerprint(seq2seq_workdir):
        raise ValueError(f"The reranker in {reranker_workdir} was trained with the tokenizer of "
                         f"{config.seq2seq_workdir!r}, not that of {seq2seq_workdir}, so it would read other words "
                         "into the prompts' ids. Train a reranker for this run (the shapes_captioner recipe with "
                         f"--config.seq2seq_workdir={seq2seq_workdir}).")
    if captioner_lib.reads(config.model) == "code_features":
        theirs = (config.model.image_length, config.model.image_vocab_size)
        ours = (seq2seq_config.model.image_length, seq2seq_config.model.image_vocab_size)
        if theirs != ours:
            raise ValueError(f"The reranker in {reranker_workdir} reads {theirs[0]} codes from a codebook of "
                             f"{theirs[1]}, but {seq2seq_workdir} draws {ours[0]} codes from {ours[1]}. Train a "
                             "reranker for this run.")
    if config.model.text_length != seq2seq_config.model.text_length or config.model.image_size != image_size:
        raise ValueError(f"The reranker in {reranker_workdir} reads {config.model.text_length} text tokens and "
                         f"{config.model.image_size}-pixel pictures, but {seq2seq_workdir} writes "
                         f"{seq2seq_config.model.text_length} tokens and its VQGAN decodes {image_size}-pixel "
                         "pictures. Train a reranker for this run.")


def _warn_if_trained_on_another_vqgan(seq2seq: runs.LoadedSeq2Seq, vqgan: runs.LoadedVQGAN) -> None:
    """The run's image-token dataset records the VQGAN that made its codes (a work directory copied without its
    `encoded/` directory has no record to check against)."""
    encoded = storage.join(seq2seq.workdir, token_records.ENCODED_DIR)
    if not storage.exists(storage.join(encoded, token_records.MANIFEST)):
        return
    made_by = token_records.read_manifest(encoded).get("vqgan", {})
    if made_by.get("fingerprint") != vqgan.fingerprint:
        warnings.warn(f"The model in {seq2seq.workdir} learned the codes of the VQGAN {made_by.get('workdir')!r} at "
                      f"step {made_by.get('step')}, but the VQGAN loaded from {vqgan.workdir} (step {vqgan.step}) has "
                      "other parameters, so its pictures will not match the model's codes. Pass that VQGAN's work "
                      "directory and checkpoint.", stacklevel=3)


def _check_prompts(prompts) -> tuple[str, ...]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = tuple(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of str (\"\" samples unconditionally); got {prompts!r}.")
    return prompts


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    return int(value)


def _per_row(name: str, values, rows: int) -> np.ndarray:
    """One integer for every row, or one per row, each in [0, 2**32) -> (rows,) int64."""
    values = np.asarray(values)
    if values.ndim == 0:
        values = np.full((rows,), _check_seed(values.item()) if name == "seed" else values)
    if values.shape != (rows,) or not np.issubdtype(values.dtype, np.integer) or (
            rows and (values.min() < 0 or values.max() >= 2 ** 32)):
        raise ValueError(f"{name} must be one integer or one per row of text_ids ({rows}), each in [0, 2**32); got "
                         f"{values.dtype} of shape {values.shape}.")
    return values.astype(np.int64)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32).")
    return int(seed)
