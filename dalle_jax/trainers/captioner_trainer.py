"""Trains the caption model that reranks a seq2seq run's candidates: data -> state -> loop -> test figures.

    dalle-jax-train --config shapes_captioner --workdir runs/reranker --config.seq2seq_workdir=runs/dalle

It reads the seq2seq run's tokenizer, encoded records and VQGAN. Once it has trained all its steps it registers
itself in that run (`runs/dalle/reranker.json`, see `runs.register_reranker`; the newest finished reranker wins),
and sampling the run then keeps, of each image's candidates, the one whose picture this model finds its prompt
likeliest for (`--reranker_workdir=""` samples without it, `--reranker_workdir=DIR` with another).
"""
from __future__ import annotations

import functools
import logging

import jax
import ml_collections
import numpy as np

from dalle_jax import extensions, parallel, runs, storage
from dalle_jax.data import token_records
from dalle_jax.models import captioner as captioner_lib
from dalle_jax.trainers import captioner_data, captioner_step, run_ends
from dalle_jax.training import loop
from dalle_jax.training.progress import Progress


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
          register: bool = True) -> dict | None:
    """Runs (or resumes) training in `workdir`; returns the final test-split figures (None when `stop_after`, SIGTERM
    or SIGINT ends this invocation early, after checkpointing; a later call resumes from there). A run that ends
    becomes the seq2seq run's default reranker unless `register` is False (a reranker for experiments only)."""
    # 1. The seq2seq run it serves, checks that need no compilation, and the run's record.
    if not config.seq2seq_workdir:
        raise ValueError("config.seq2seq_workdir is empty: pass the work directory of a trained seq2seq run, e.g. "
                         "--config.seq2seq_workdir=runs/dalle.")
    extensions.check_config(config)
    seq2seq_config = runs.read_config(config.seq2seq_workdir, "seq2seq")
    tokenizer = runs.load_tokenizer(config.seq2seq_workdir)
    mesh = parallel.make_mesh(config.mesh)
    vqgan = runs.load_vqgan(runs.vqgan_workdir_of(config.seq2seq_workdir, seq2seq_config), mesh)
    config = with_seq2seq_shapes(config, seq2seq_config, tokenizer, vqgan)
    captioner_step.check_config(config)
    for field in ("batch_size", "eval_batch_size"):
        parallel.check_global_batch(config[field], mesh, f"config.{field}")
    runs.save_config(config, workdir)

    # 2. Pictures (or codes) and captions, decoded and tokenized once.
    encoded_dir = storage.join(config.seq2seq_workdir, token_records.ENCODED_DIR)
    reads_codes = captioner_lib.reads(config.model) == "code_features"
    decode = None if reads_codes else captioner_data.decode_fn(vqgan)
    length = config.model.text_length
    contrast_captions = extensions.one_hook(config, "contrast_captions")
    train_data = captioner_data.load_split(encoded_dir, "train", decode, tokenizer, length,
                                           max_examples=None if config.train_examples < 0 else config.train_examples,
                                           contrast_captions=contrast_captions)

    # 3. State, or the newest checkpoint's.
    cadence = loop.Cadence.from_config(config, stop_after)
    setup, state, shardings = captioner_step.create(config, mesh)
    begun = run_ends.begin(config, workdir, state, shardings, cadence)
    if begun is None:
        return None
    state, start, checkpointer, writer = begun.state, begun.step, begun.checkpointer, begun.writer
    if start == 0 and reads_codes:  # a fresh run measures its codes' appearance on the seq2seq run's images
        features = extensions.one_hook(config, "code_feature_table")(
            seq2seq_config, token_records.open_split(encoded_dir, "train"))
        state = dict(state, params=dict(state["params"], code_features=jax.device_put(
            features, shardings["params"]["code_features"])))

    # 4. Compiled steps.
    train_step = parallel.jit_sharded_step(functools.partial(captioner_step.train_step, setup), shardings, mesh)
    eval_step = jax.jit(functools.partial(captioner_step.eval_step, setup),
                        in_shardings=(shardings["params"], parallel.batch_sharding(mesh)),
                        out_shardings=parallel.replicated(mesh))

    @functools.cache  # each evaluation split is read and decoded once, however often it is evaluated
    def eval_data(split: str) -> captioner_data.CaptionedPictures:
        return captioner_data.load_split(encoded_dir, split, decode, tokenizer, length,
                                         max_examples=config.eval_examples, progress=False,
                                         contrast_captions=contrast_captions)

    def evaluate_split(params, split: str) -> dict:
        return _evaluate(eval_step, params, eval_data(split), config.eval_batch_size, mesh)

    def evaluate_and_write(state, step):
        writer.write_scalars(step, {f"eval/{k}": v for k, v in evaluate_split(state["params"], "validation").items()})

    # 5. The loop: step, log, evaluate, checkpoint. Each batch follows from (seed, step), so resuming needs no
    # iterator position.
    next_step = iter(range(start + 1, cadence.last_step + 1))

    def next_batch():
        batch = captioner_data.train_batch(train_data, config.seed, next(next_step), config.batch_size)
        return parallel.global_batch(_this_process(batch), mesh)

    state, last_trained = loop.run(
        state, start=start, cadence=cadence, train_step=train_step, next_batch=next_batch,
        evaluate=evaluate_and_write, checkpointer=checkpointer, data_iterator=None, writer=writer,
        progress=Progress(config.num_steps, start, "captioner"),
        rates=lambda steps, seconds: dict(steps_per_s=steps / seconds),
        shown=dict(loss="loss", accuracy="token_accuracy"))

    # 6. Final figures on the test split, once the run has trained all its steps.
    def final_figures():
        return evaluate_split(state["params"], "test"), "test"

    figures = run_ends.end(config, workdir, writer, last_trained, final_figures)
    if figures is not None and register:  # only a finished run: a half-trained one would pick worse than none
        path = runs.register_reranker(config.seq2seq_workdir, workdir, config.num_steps)
        logging.info("Registered %s as the reranker of %s in %s", workdir, config.seq2seq_workdir, path)
    return figures


def with_seq2seq_shapes(config, seq2seq_config, tokenizer, vqgan) -> ml_collections.ConfigDict:
    """`config` with the shapes it takes from the seq2seq run (text length, vocabulary, picture size, codes and
    their feature width) and the fingerprint of that run's tokenizer, which sampling checks against the run it
    reranks for."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.text_length = int(seq2seq_config.model.text_length)
    config.model.vocab_size = int(tokenizer.vocab_size)
    config.model.image_size = int(vqgan.config.model.resolution)
    config.model.image_length = int(seq2seq_config.model.image_length)
    config.model.image_vocab_size = int(seq2seq_config.model.image_vocab_size)
    config.model.code_features = 0
    if captioner_lib.reads(config.model) == "code_features":
        width = extensions.one_hook(config, "code_feature_width")
        if width is None or extensions.one_hook(config, "code_feature_table") is None:
            raise ValueError("config.model.reads='code_features' needs an extension that measures the codes' "
                             "features (hooks code_feature_width and code_feature_table), and config.extensions="
                             f"{tuple(config.extensions)} lists none; add one (e.g. "
                             "'dalle_jax.shapes.captioner_code_features') or set --config.model.reads=pixels.")
        config.model.code_features = width(seq2seq_config)
    config.tokenizer_sha256 = runs.tokenizer_fingerprint(config.seq2seq_workdir)
    return config


def _this_process(batch: dict) -> dict:
    """This process's rows of a global batch that every process drew alike."""
    count, index = jax.process_count(), jax.process_index()
    return {k: np.array_split(v, count)[index] for k, v in batch.items()}


def _evaluate(eval_step, params, data: captioner_data.CaptionedPictures, batch_size: int, mesh) -> dict:
    """`loss` (nats per caption token, over every caption of each image) and `twin_accuracy`: how often a
    two-object scene's canonical caption is likelier than each of its twins."""
    totals = dict(log_likelihood=0.0, tokens=0, twin_wins=0, twin_scenes=0)
    rows = np.arange(data.captions.shape[1])[None, :] < data.caption_counts[:, None]
    for start in range(0, len(data) - batch_size + 1, batch_size):
        part = slice(start, start + batch_size)
        batch = dict(images=data.images[part], captions=data.captions[part], caption_rows=rows[part],
                     twin_ids=data.twins[part], twin_rows=data.twin_rows[part])
        for k, v in jax.device_get(eval_step(params, parallel.global_batch(_this_process(batch), mesh))).items():
            totals[k] += v.item()
    if not totals["tokens"]:
        raise ValueError(f"config.eval_batch_size={batch_size} is larger than the {len(data)} examples evaluated; "
                         "lower it or raise config.eval_examples.")
    figures = dict(loss=-totals["log_likelihood"] / totals["tokens"], examples=float(len(data) // batch_size
                                                                                   * batch_size))
    if totals["twin_scenes"]:
        figures["twin_accuracy"] = totals["twin_wins"] / totals["twin_scenes"]
    logging.info("captioner evaluation: %s", figures)
    return figures
