"""Trains the VQGAN image tokenizer: data -> sharded state -> compiled steps -> metrics and checkpoints.

Read top to bottom; every piece it calls is a small module of its own.
"""
from __future__ import annotations

import copy
import functools

import jax
import ml_collections
import numpy as np

from dalle_jax import extensions, parallel, runs
from dalle_jax.data import captioned_folder, image_grid, pipeline, sources, split_checks
from dalle_jax.models import quantizer as vq
from dalle_jax.trainers import init_from, run_ends, vqgan_step
from dalle_jax.training import loop
from dalle_jax.training.progress import Progress


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict | None:
    """Runs (or resumes) training in `workdir`; returns the final test-split figures.

    `stop_after` ends this invocation once that step is trained and checkpointed (for time-sliced jobs); a later
    call resumes from there. It returns None then, and also when SIGTERM or SIGINT stopped it (after checkpointing
    the current step).
    """
    # 1. Devices, the extensions' checks and the data's.
    config = copy.deepcopy(config)  # the evaluation batch may be fitted to the splits below
    extensions.check_config(config)
    split_checks.check_data_config(config.data)
    first_params = init_from.find_start(config, workdir)  # imported weights or config.init_from, checked
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_global_batch(config.data.batch_size, mesh)
    parallel.check_global_batch(config.data.eval_batch_size, mesh, "config.data.eval_batch_size")

    # 2. Data: prepared on first use, its splits checked against the batches, read by grain with a checkpointable
    # position; then the run's record.
    builder = sources.prepare(config.data)
    sizes = split_checks.split_sizes(builder)
    config.data.eval_batch_size = split_checks.fitted_eval_batch(
        config.data, sizes, split_checks.batch_multiple(parallel.batch_parallelism(mesh), jax.process_count()))
    runs.save_config(config, workdir)
    transform = pipeline.image_transform(config.data.image_key, config.data.image_size)
    train_iter = pipeline.train_iterator(
        sources.open_split(builder, "train", config.data), transform, global_batch=config.data.batch_size,
        seed=config.seed, read_threads=config.data.read_threads, prefetch=config.data.prefetch)

    # 3. State, built directly in its sharding, or restored from the newest checkpoint.
    cadence = loop.Cadence.from_config(config, stop_after)
    setup, state, shardings = vqgan_step.create(config, mesh)
    begun = run_ends.begin(config, workdir, state, shardings, cadence, data_iterator=train_iter,
                           first_params=first_params)
    if begun is None:
        return None
    state, start, checkpointer, writer = begun.state, begun.step, begun.checkpointer, begun.writer
    if start == 0 and (bad_examples := captioned_folder.bad_example_metrics(builder)):
        writer.write_scalars(0, bad_examples)  # what the dataset skipped or normalised, once per run

    # 4. Compiled steps with explicit shardings; the train step donates the old state.
    batch_sh = parallel.batch_sharding(mesh)
    train_step = jit_train_step(setup, shardings, mesh)
    # Evaluation outputs are gathered (replicated) so every process can read all of them.
    eval_step = jax.jit(functools.partial(vqgan_step.eval_step, setup),
                        in_shardings=(shardings["params"], batch_sh), out_shardings=parallel.replicated(mesh))
    evaluate = functools.partial(_evaluate, setup, eval_step, mesh, builder, transform)

    def evaluate_and_write(state, step):
        figures, grid = evaluate(state["params"], "validation", config.data.eval_batches)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in figures.items()})
        writer.write_images(step, {"eval/reconstructions": grid})

    def rates(steps, seconds):
        return dict(steps_per_s=steps / seconds, images_per_s=steps * config.data.batch_size / seconds)

    # 5. The loop: step, log, evaluate, checkpoint.
    state, last_trained = loop.run(
        state, start=start, cadence=cadence, train_step=train_step,
        next_batch=lambda: parallel.global_batch(next(train_iter), mesh), evaluate=evaluate_and_write,
        checkpointer=checkpointer, data_iterator=train_iter, writer=writer,
        progress=Progress(config.num_steps, start, "vqgan"), rates=rates,
        shown=dict(loss="loss", psnr="psnr", usage="batch_codebook_usage"))

    # 6. Final figures on the test split (validation where the dataset has none), with those of the extensions'
    # `evaluate_reconstructions`, once the run has trained all its steps.
    def final_figures():
        split = split_checks.final_split(sizes)
        return evaluate(state["params"], split, -1, final=True)[0], split

    return run_ends.end(config, workdir, writer, last_trained, final_figures)


def jit_train_step(setup: vqgan_step.Setup, shardings, mesh):
    """The train step compiled with explicit shardings, donating the old state (also lowered ahead of time by
    dalle_jax.pods.aot for a TPU topology)."""
    return parallel.jit_sharded_step(functools.partial(vqgan_step.train_step, setup), shardings, mesh,
                                     setup.config.get("tpu_compiler_options"))


def batch_shapes(config: ml_collections.ConfigDict) -> dict:
    """Shape and dtype of each field of a global training batch: uint8 images."""
    size = config.data.image_size
    return dict(image=jax.ShapeDtypeStruct((config.data.batch_size, size, size, 3), np.uint8))


def _evaluate(setup, eval_step, mesh, builder, transform, params, split: str, num_batches: int, final: bool = False):
    """Reconstruction figures over a split: loss, PSNR, codebook usage and perplexity (`final`: and the figures of
    the extensions' `evaluate_reconstructions`)."""
    config = setup.config
    evaluators = extensions.hooks(config, "evaluate_reconstructions") if final else []
    source = sources.open_split(builder, split, config.data)
    batches = pipeline.eval_batches(source, transform, global_batch=config.data.eval_batch_size,
                                    num_batches=num_batches, read_threads=config.data.read_threads)
    losses, psnr_sum, count, counts, shown = [], 0.0, 0, 0, None
    reconstructions = []
    for local in batches:
        out = jax.device_get(eval_step(params, parallel.global_batch(local, mesh)))
        losses.append(float(out["reconstruction"]))
        psnr_sum += float(out["psnr_sum"])
        count += out["indices"].shape[0]
        counts = counts + out["counts"]
        if shown is None:
            n = min(config.num_recon_images, out["reconstructions"].shape[0])
            originals = np.asarray(local["image"])[:n] if jax.process_count() == 1 else None
            shown = out["reconstructions"][:n] if originals is None else np.concatenate(
                [originals, out["reconstructions"][:n]])
        if evaluators:
            reconstructions.append(out["reconstructions"])
    figures = dict(reconstruction=float(np.mean(losses)), psnr=psnr_sum / count,
                   codebook_usage=float(np.mean(counts > 0)),
                   codebook_perplexity=float(vq.perplexity_from_counts(counts)),
                   codebook_size=float(config.model.codebook_size), examples=float(count))
    for evaluate_reconstructions in evaluators:
        figures.update(evaluate_reconstructions(config, source, np.concatenate(reconstructions)))
    grid = image_grid.image_grid(shown, columns=min(config.num_recon_images, shown.shape[0]))
    return figures, grid

