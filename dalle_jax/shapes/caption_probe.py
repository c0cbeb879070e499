"""Teacher-forced caption probe: does a seq2seq run find each two-object image more likely under its own caption
than under a twin caption that differs only in which object is which?

    python -m dalle_jax.shapes.caption_probe --workdir runs/demo/dalle --out probe.json \
        [--split test] [--max_examples 800]

For every two-object record of a split (captioned_shapes), the probe scores the record's image tokens (the true
image, no sampling) under its canonical caption and under three twins: the relation reversed ("to the left of" <->
"to the right of", "above" <-> "below"), the two colours exchanged, the two shapes exchanged (a twin that would read
the same, such as exchanging two equal colours, is left out). A model that reads a caption as a bag of words gives a
caption and its twin the same likelihood: the true caption then wins about half the time, by a margin near 0. The
judge's relation accuracy mixes this with objects that are missing or misdrawn; the probe isolates word order.

The report (a JSON object, also returned by `probe_split`):

    {"workdir", "step", "split", "twins": {twin: {"count", "true_wins", "median_margin",
                                                  "by_relation": {relation: {"count", "true_wins", "median_margin"}}}}}

`margin` is log p(image | caption) - log p(image | twin) in nats per image; `true_wins` the fraction of margins > 0.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from dalle_jax import command_line, parallel, runs
from dalle_jax.data import shapes_scene, token_records
from dalle_jax.shapes import report_file
from dalle_jax.models import dalle_bart

TWINS = ("relation_reversed", "colors_exchanged", "shapes_exchanged")


def twin_caption(scene: dict, twin: str) -> str | None:
    """The canonical caption of a two-object `scene` with `twin` applied; None when it reads as the scene's own."""
    objects, relation = scene["objects"], scene["relation"]
    if len(objects) != 2:
        raise ValueError(f"a twin caption needs a two-object scene, got {len(objects)} object(s).")
    a, b = objects
    if twin == "relation_reversed":
        return shapes_scene.canonical_caption({"objects": [a, b], "relation": shapes_scene.INVERSE_RELATION[relation]})
    if twin not in TWINS:
        raise ValueError(f"twin={twin!r} is unknown; use one of {TWINS}.")
    key = "color" if twin == "colors_exchanged" else "shape"
    if a[key] == b[key]:
        return None
    swapped = [dict(a, **{key: b[key]}), dict(b, **{key: a[key]})]
    return shapes_scene.canonical_caption({"objects": swapped, "relation": relation})


def log_likelihood_fn(loaded: runs.LoadedSeq2Seq):
    """A compiled (text_ids (N, text_length), codes (N, image_length)) -> (N,) float32: log p(codes | text) under
    teacher forcing, summed over each image's tokens."""
    compiled = jax.jit(functools.partial(_log_likelihoods, loaded))
    return lambda text_ids, codes: np.asarray(compiled(loaded.params, jnp.asarray(text_ids, jnp.int32),
                                                       jnp.asarray(codes, jnp.int32)))


def _log_likelihoods(loaded: runs.LoadedSeq2Seq, params, text_ids, codes):
    with parallel.activation_sharding(loaded.mesh, loaded.config.sharding_rules):
        model = loaded.model(params)
        logits = model(text_ids, dalle_bart.teacher_forcing_inputs(codes, model.start_token), deterministic=True)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, codes[..., None], axis=-1)[..., 0].sum(axis=-1)


def _summary(margins: np.ndarray) -> dict:
    return dict(count=int(margins.size), true_wins=float(np.mean(margins > 0)), median_margin=float(np.median(margins)))


def probe_split(loaded: runs.LoadedSeq2Seq, split: str = "test", *, max_examples: int | None = None,
                batch_size: int = 100) -> dict:
    """The probe's report over the two-object records among the first `max_examples` (default: all) of `split`."""
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples} must be at least 1.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    source = token_records.open_split(os.path.join(loaded.workdir, token_records.ENCODED_DIR), split)
    count = len(source) if max_examples is None else min(len(source), max_examples)
    scenes, codes = [], []
    for i in range(count):
        record = source[i]
        if record["scene"] is None:
            raise ValueError(f"Record {i} of split {split!r} in {loaded.workdir!r} has no scene: its dataset is not "
                             "captioned_shapes, so it has no twin captions to probe.")
        scene = shapes_scene.scene_from_example(record["scene"])
        if len(scene["objects"]) == 2:
            scenes.append(scene)
            codes.append(np.asarray(record["codes"], np.int32))
    if not scenes:
        raise ValueError(f"The first {count} records of split {split!r} hold no two-object scene; probe more "
                         "--max_examples or another split.")
    length = loaded.config.model.text_length
    log_likelihoods = log_likelihood_fn(loaded)

    def score(captions: list[str], rows: list[int]) -> np.ndarray:
        """log p(image of scene rows[j] | captions[j]) for every j, in batches."""
        return np.concatenate([
            log_likelihoods(np.stack([loaded.tokenizer.encode(c, length) for c in captions[s:s + batch_size]]),
                            np.stack([codes[r] for r in rows[s:s + batch_size]]))
            for s in range(0, len(rows), batch_size)])

    true = score([shapes_scene.canonical_caption(s) for s in scenes], list(range(len(scenes))))
    relations = np.array([s["relation"] for s in scenes])
    twins = {}
    for twin in TWINS:
        rows, captions = [], []
        for i, scene in enumerate(scenes):
            caption = twin_caption(scene, twin)
            if caption is not None:
                rows.append(i)
                captions.append(caption)
        if not rows:
            twins[twin] = dict(count=0, by_relation={})
            continue
        margins = true[rows] - score(captions, rows)
        by_relation = {rel: _summary(margins[relations[rows] == rel]) for rel in shapes_scene.INVERSE_RELATION
                       if np.any(relations[rows] == rel)}
        twins[twin] = dict(_summary(margins), by_relation=by_relation)
    return dict(workdir=loaded.workdir, step=loaded.step, split=split, twins=twins)


# ---- the command line ----

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Work directory of a trained seq2seq run.", **fv)
    flags.DEFINE_string("out", None, "Where to write the JSON report.", **fv)
    flags.DEFINE_string("split", "test", "Split of the run's encoded dataset.", **fv)
    flags.DEFINE_integer("max_examples", None, "Probe the two-object scenes among this many records (default: all).",
                         **fv)
    flags.DEFINE_integer("batch_size", 100, "Captions scored per batch.", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to probe (default: the newest).", **fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=flag_values)


def run(fv: flags.FlagValues) -> dict:
    """Everything the command does, from parsed flags; returns the report it wrote."""
    if fv.max_examples is not None and fv.max_examples < 1:
        raise app.UsageError(f"--max_examples={fv.max_examples} must be at least 1.")
    if fv.batch_size < 1:
        raise app.UsageError(f"--batch_size={fv.batch_size} must be at least 1.")
    report = probe_split(runs.load_seq2seq(fv.workdir, step=fv.step), fv.split,
                         max_examples=fv.max_examples, batch_size=fv.batch_size)
    report_file.write_report(fv.out, report)
    for twin, result in report["twins"].items():
        if result["count"]:
            logging.info("%s: true caption wins %.2f of %d, median margin %.2f nats", twin, result["true_wins"],
                         result["count"], result["median_margin"])
    return report


def main(argv):
    logging.set_verbosity(logging.INFO)
    run(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    command_line.run(main, __name__)
