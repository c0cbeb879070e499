"""Trains DalleBart to predict a VQGAN's image tokens from captions: encode -> tokenizer -> state -> loop.

Read top to bottom; every piece it calls is a small module of its own. The first run encodes the dataset with the
VQGAN and trains the text tokenizer; later runs (and resumes) reuse both from the work directory.
"""
from __future__ import annotations

import functools
import logging
import math
import types

import jax
import ml_collections
import numpy as np

from dalle_jax import extensions, parallel, runs, storage
from dalle_jax.data import pipeline, sources, split_checks, token_records
from dalle_jax.models import dalle_bart
from dalle_jax.trainers import (encode_stage, init_from, run_ends, seq2seq_samples, seq2seq_step, text_stage,
                                vqgan_dataset)
from dalle_jax.training import loop, throughput
from dalle_jax.training.progress import Progress

SAMPLE_PROMPTS = 4  # Prompts of the sample grid taken from `validation` when config.sampling.prompts is empty.


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict | None:
    """Runs (or resumes) training in `workdir`; returns the final test-split figures (None when `stop_after`, SIGTERM
    or SIGINT ends this invocation early, after checkpointing; a later call resumes from there)."""
    # 1. The data (the VQGAN's dataset unless the config names one), devices, checks that need no compilation.
    if not config.vqgan_workdir:
        raise ValueError("config.vqgan_workdir is empty: pass the work directory of a trained VQGAN, e.g. "
                         "--config.vqgan_workdir=runs/vqgan.")
    config = vqgan_dataset.resolve(config)  # a copy; the run's record holds what it read
    seq2seq_step.check_config(config)  # with the checks of config.extensions
    split_checks.check_data_config(config.data)
    first_params = init_from.find_start(config, workdir)  # imported weights or config.init_from, checked
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_global_batch(config.data.batch_size, mesh)
    parallel.check_global_batch(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")
    parallel.check_global_batch(config.data.encode_batch_size, mesh, "config.data.encode_batch_size")
    if (described := _describe_vqgan(config.vqgan_workdir)) is not None:
        _check_matches_vqgan(config, described)  # from the VQGAN's config alone, before anything is compiled
    vqgan = runs.load_vqgan(config.vqgan_workdir, mesh)
    sizes = split_checks.split_sizes(sources.prepare(config.data))
    config.data.eval_batch_size = split_checks.fitted_eval_batch(
        config.data, sizes, split_checks.batch_multiple(parallel.batch_parallelism(mesh), jax.process_count()))
    final_split = split_checks.final_split(sizes)
    runs.save_config(config, workdir)

    # 2. The image-token dataset (encoded once by this VQGAN) and the text tokenizer (trained once).
    encoded_dir = storage.join(workdir, token_records.ENCODED_DIR)
    encode_stage.encode_dataset(config.data, vqgan, encoded_dir, mesh, batch_size=config.data.encode_batch_size)
    train_source = token_records.open_split(encoded_dir, "train")
    tokenizer = text_stage.prepare_tokenizer(config, workdir, _all_captions(train_source))
    if not config.sampling.prompts:  # the sample grid shows the first captions of `validation`
        config.sampling.prompts = _first_captions(token_records.open_split(encoded_dir, split_checks.EVALUATED))
        runs.save_config(config, workdir)
    train_captions = pipeline.caption_and_codes(
        tokenizer, config.model.text_length, random_caption=True, canonical_prob=config.data.canonical_caption_prob,
        train_caption=_train_caption(config))
    train_iter = pipeline.train_iterator(
        train_source, None, global_batch=config.data.batch_size, seed=config.seed,
        read_threads=config.data.read_threads, prefetch=config.data.prefetch, random_transform=train_captions)
    eval_transform = pipeline.caption_and_codes(tokenizer, config.model.text_length, random_caption=False)

    # 3. State, built directly in its sharding, or restored from the newest checkpoint.
    cadence = loop.Cadence.from_config(config, stop_after)
    setup, state, shardings = seq2seq_step.create(config, mesh)
    begun = run_ends.begin(config, workdir, state, shardings, cadence, data_iterator=train_iter,
                           first_params=first_params)
    if begun is None:
        return None
    state, start, checkpointer, writer = begun.state, begun.step, begun.checkpointer, begun.writer
    if start == 0 and first_params is None:  # a fresh run: extensions may set parameters (e.g. measured on images)
        for init_params in extensions.hooks(config, "init_params"):
            state = dict(state, params=jax.device_put(init_params(config, state["params"], train_source),
                                                      shardings["params"]))

    # 4. Compiled steps with explicit shardings; the train step donates the old state.
    batch_sh = parallel.batch_sharding(mesh)
    train_step = jit_train_step(setup, shardings, mesh)
    eval_step = jax.jit(functools.partial(seq2seq_step.eval_step, setup),
                        in_shardings=(shardings["params"], batch_sh), out_shardings=parallel.replicated(mesh))
    sampler = seq2seq_samples.SampleGrid(config, setup, vqgan, tokenizer, mesh)

    def evaluate_and_write(state, step):
        figures = _evaluate(config, eval_step, mesh, token_records.open_split(encoded_dir, "validation"),
                            eval_transform, state["params"], config.data.eval_batches)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in figures.items()})
        writer.write_images(step, {"eval/samples": sampler(state["params"])})

    # 5. Throughput: tokens per second and model FLOPs utilisation against this machine's measured matmul peak.
    flops_per_step = dalle_bart.train_flops_per_example(config.model) * config.data.batch_size
    peak = throughput.matmul_peak_flops()
    logging.info("Model: %.3g FLOPs per train step; device matmul peak measured at %.3g FLOP/s", flops_per_step, peak)

    def rates(steps, seconds):
        per_s = steps / seconds
        return dict(steps_per_s=per_s, tokens_per_s=per_s * config.data.batch_size * config.model.image_length,
                    model_flops_per_step=flops_per_step,
                    mfu=throughput.mfu(flops_per_step, per_s, peak, jax.device_count()))

    # 6. The loop: step, log, evaluate, checkpoint.
    state, last_trained = loop.run(
        state, start=start, cadence=cadence, train_step=train_step,
        next_batch=lambda: parallel.global_batch(next(train_iter), mesh), evaluate=evaluate_and_write,
        checkpointer=checkpointer, data_iterator=train_iter, writer=writer,
        progress=Progress(config.num_steps, start, "seq2seq"), rates=rates,
        shown=dict(loss="loss", accuracy="token_accuracy", mfu="mfu"))

    # 7. Final figures on the test split (validation where the dataset has none), once the run has trained all its
    # steps.
    def final_figures():
        source = token_records.open_split(encoded_dir, final_split)
        return _evaluate(config, eval_step, mesh, source, eval_transform, state["params"], -1), final_split

    return run_ends.end(config, workdir, writer, last_trained, final_figures)


def jit_train_step(setup: seq2seq_step.Setup, shardings, mesh):
    """The train step compiled with explicit shardings, donating the old state (also lowered ahead of time by
    dalle_jax.pods.aot for a TPU topology)."""
    return parallel.jit_sharded_step(functools.partial(seq2seq_step.train_step, setup), shardings, mesh,
                                     setup.config.get("tpu_compiler_options"))


def batch_shapes(config: ml_collections.ConfigDict) -> dict:
    """Shape and dtype of each field of a global training batch."""
    b = config.data.batch_size
    return dict(text_ids=jax.ShapeDtypeStruct((b, config.model.text_length), np.int32),
                codes=jax.ShapeDtypeStruct((b, config.model.image_length), np.int32))


def _train_caption(config):
    """The caption override of the one extension that gives one (`train_caption` hook), or None."""
    hook = extensions.one_hook(config, "train_caption")
    return None if hook is None else hook(config)


def _describe_vqgan(vqgan_workdir: str):
    """The codebook and grid of the VQGAN in `vqgan_workdir`, read from its config alone; None when the directory
    holds no VQGAN config (loading it then says what is wrong)."""
    if not storage.isfile(storage.join(vqgan_workdir, "config.json")):
        return None
    vqgan_config = runs.load_config(vqgan_workdir)
    if vqgan_config.get("trainer") != "vqgan":
        return None
    from flax import nnx
    from dalle_jax.models.vqgan import VQGAN
    model = nnx.eval_shape(lambda: VQGAN(vqgan_config.model, rngs=nnx.Rngs(0)))
    return types.SimpleNamespace(workdir=storage.abspath(vqgan_workdir), codebook_size=int(model.codebook_size),
                                 grid_size=int(model.grid_size))


def _check_matches_vqgan(config, vqgan) -> None:
    """`vqgan` has `workdir`, `codebook_size` and `grid_size` (a LoadedVQGAN or `_describe_vqgan`'s answer)."""
    if vqgan.codebook_size > config.model.image_vocab_size:
        raise ValueError(f"The VQGAN in {vqgan.workdir} has {vqgan.codebook_size} codes but "
                         f"config.model.image_vocab_size={config.model.image_vocab_size}; set "
                         f"config.model.image_vocab_size={vqgan.codebook_size}.")
    if vqgan.codebook_size < config.model.image_vocab_size:
        logging.warning("config.model.image_vocab_size=%d exceeds the VQGAN's %d codes; ids from %d on are never "
                        "targets.", config.model.image_vocab_size, vqgan.codebook_size, vqgan.codebook_size)
    if vqgan.grid_size ** 2 != config.model.image_length:
        raise ValueError(f"The VQGAN in {vqgan.workdir} gives {vqgan.grid_size}x{vqgan.grid_size} codes per image "
                         f"but config.model.image_length={config.model.image_length}; set "
                         f"config.model.image_length={vqgan.grid_size ** 2}.")


def _first_captions(source, count: int = SAMPLE_PROMPTS) -> tuple[str, ...]:
    """The first caption of each of the first `count` records with distinct ones."""
    captions = []
    for i in range(len(source)):
        caption = source[i]["captions"][0]
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            break
    return tuple(captions)


def _all_captions(source):
    for i in range(len(source)):
        yield from source[i]["captions"]


def _evaluate(config, eval_step, mesh, source, transform, params, num_batches: int) -> dict:
    """Cross-entropy (`loss`), `perplexity` and `token_accuracy` of teacher-forced image tokens on a split."""
    batches = pipeline.eval_batches(source, transform, global_batch=config.data.eval_batch_size,
                                    num_batches=num_batches, read_threads=config.data.read_threads)
    results = [jax.device_get(eval_step(params, parallel.global_batch(local, mesh))) for local in batches]
    loss = float(np.mean([r["cross_entropy"] for r in results]))
    return dict(loss=loss, perplexity=math.exp(loss), token_accuracy=float(np.mean([r["token_accuracy"]
                                                                                    for r in results])),
                examples=float(len(results) * config.data.eval_batch_size))
