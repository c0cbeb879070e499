"""Judged evaluation of a seq2seq run: sample one image per captioned scene and check it shows the scene.

    dalle-jax-evaluate --workdir runs/dalle --out report.json \
        [--split test --split test_compositional] [--prompts_file scenes.jsonl] [--max_examples 200]

The examples come from the work directory's image-token records (caption = the record's first, canonical
caption; scene = its `scene`), or from a JSONL file of `{"prompt": str, "scene": scene}` lines (a scene as in
`dalle_jax.data.shapes_scene`). Example i of a set is sampled from (seed, i) (with K candidates: the likeliest of
(seed, iK), ..., (seed, iK + K-1), or, with a reranker, the one it scores highest: by default the reranker
registered for the run, `--reranker_workdir=DIR` another, `--reranker_workdir=""` none), so a report can be
reproduced image by image. The report (a JSON object, also returned by `evaluate_samples`):

    {"workdir", "step", "seed", "settings": {"temperature", "top_k", "top_p", "cond_scale", "candidates"},
     "scorer": "seq2seq" | "reranker", "reranker": {"workdir", "step"} (when it scored),
     "sets": {name: {"source", "count", "accuracy", "exact_accuracy", "spec_accuracy",
                     "attributes": {attribute: {"accuracy": float | null, "exact_accuracy": float | null,
                                                "spec_accuracy": float | null, "count": int}},
                     "one_object_pairs": {"<colour> <shape>": {"accuracy": float, "count": int, "shape": float}},
                     "examples": [{"index", "prompt", "correct", "exact", "spec_correct", "extra_objects",
                                   "attributes": {attribute: bool}}]}}}

`accuracy` is the fraction of images judged correct on everything their caption states, shapes read by the
judge's strict reading (`dalle_jax.shapes.judge`, `strict=True`: a region that looks like no shape is `unclear`,
which is wrong); `exact_accuracy` the fraction also holding no object-sized region (`extra_objects`) beyond the
scene's objects; `spec_accuracy` the fraction correct under the spec's reading (any blob that is neither triangle
nor square a circle), the `accuracy` of reports made before the strict reading, kept so figures compare with them.
An attribute's figures are over the images whose caption states it (relation: two-object scenes only), null when
none does: its `exact_accuracy` counts an image when the attribute is right and the image holds no extra object.
`one_object_pairs` splits the one-object scenes by their object's colour and shape (`accuracy` of the images,
and how often the `shape` was right, both strict): on `test_compositional` it shows which held-out pair a model
fails to draw.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Sequence

import numpy as np
from absl import app, flags, logging

from dalle_jax import command_line, storage
from dalle_jax.data import shapes_scene, token_records
from dalle_jax.shapes import judge as judge_lib, report_file
from dalle_jax.inference.text_to_image import TextToImage
from dalle_jax.inference.sampling import SamplingSettings

DEFAULT_SPLITS = ("test", "test_compositional")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    scene: dict


def split_examples(workdir: str, split: str, max_examples: int | None = None) -> list[Example]:
    """The first `max_examples` (default: all) records of `split` in the work directory's encoded dataset."""
    source = token_records.open_split(storage.join(workdir, token_records.ENCODED_DIR), split)
    count = len(source) if max_examples is None else min(len(source), max_examples)
    examples = []
    for i in range(count):
        record = source[i]
        if record["scene"] is None:
            raise ValueError(f"Record {i} of split {split!r} in {workdir!r} has no scene: its dataset is not "
                             "captioned_shapes, so its images cannot be judged. Evaluate a --prompts_file of "
                             "{\"prompt\", \"scene\"} lines instead.")
        examples.append(Example(record["captions"][0], shapes_scene.scene_from_example(record["scene"])))
    return examples


def read_prompts_file(path: str, max_examples: int | None = None) -> list[Example]:
    """Examples from a JSONL file of {"prompt": str, "scene": scene} lines (blank lines skipped)."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"Prompts file {storage.shown(path)!r} does not exist; write one "
                                "{\"prompt\": ..., \"scene\": ...} JSON object per line.")
    examples = []
    with storage.open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                prompt, scene = entry["prompt"], shapes_scene.scene_from_example(entry["scene"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{number} is not a {{\"prompt\": str, \"scene\": scene}} JSON object with "
                                 f"a captioned_shapes scene ({type(e).__name__}: {e}).") from e
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{number}: prompt must be a string, got {prompt!r}.")
            examples.append(Example(prompt, scene))
            if max_examples is not None and len(examples) == max_examples:
                break
    if not examples:
        raise ValueError(f"Prompts file {path!r} holds no examples.")
    return examples


def judge_images(examples: Sequence[Example], images: np.ndarray) -> dict:
    """Judges image i against example i's scene: the `count`, `accuracy`, `exact_accuracy`, `spec_accuracy`,
    `attributes`, `one_object_pairs` and `examples` of a set."""
    if len(examples) != len(images):
        raise ValueError(f"{len(examples)} examples but {len(images)} images; pass one image per example.")
    judgements = [judge_lib.judge(image, example.scene, strict=True) for example, image in zip(examples, images)]
    spec = [judge_lib.judge(image, example.scene) for example, image in zip(examples, images)]
    attributes = {}
    for name in judge_lib.ATTRIBUTES:
        judged = [(j, s) for j, s in zip(judgements, spec) if name in j.attributes]
        figures = dict(accuracy=None, exact_accuracy=None, spec_accuracy=None)
        if judged:
            figures = dict(accuracy=_mean(j.attributes[name] for j, _ in judged),
                           exact_accuracy=_mean(j.exact_attribute(name) for j, _ in judged),
                           spec_accuracy=_mean(s.attributes[name] for _, s in judged))
        attributes[name] = dict(figures, count=len(judged))
    return dict(count=len(judgements), accuracy=_mean(j.correct for j in judgements),
                exact_accuracy=_mean(j.exact for j in judgements), spec_accuracy=_mean(s.correct for s in spec),
                attributes=attributes, one_object_pairs=one_object_pairs(examples, judgements),
                examples=[dict(index=i, prompt=example.prompt, correct=bool(j.correct), exact=bool(j.exact),
                               spec_correct=bool(s.correct), extra_objects=len(j.extras),
                               attributes={k: bool(v) for k, v in j.attributes.items()})
                          for i, (example, j, s) in enumerate(zip(examples, judgements, spec))])


def _mean(values) -> float:
    return float(np.mean(list(values)))


def one_object_pairs(examples: Sequence[Example], judgements: Sequence[judge_lib.Judgement]) -> dict:
    """{"<colour> <shape>": {"accuracy", "count", "shape"}} over the one-object scenes, in palette then shape
    order (the order of `shapes_scene.COLORS` and `SHAPES`)."""
    by_pair = {}
    for example, judgement in zip(examples, judgements):
        scene = shapes_scene.scene_from_example(example.scene)
        if len(scene["objects"]) == 1:
            obj = scene["objects"][0]
            by_pair.setdefault((obj["color"], obj["shape"]), []).append(judgement)
    order = {pair: i for i, pair in enumerate((c, s) for c in shapes_scene.COLORS for s in shapes_scene.SHAPES)}
    return {f"{colour} {shape}": dict(accuracy=float(np.mean([j.correct for j in found])), count=len(found),
                                      shape=float(np.mean([j.attributes["shape"] for j in found])))
            for (colour, shape), found in sorted(by_pair.items(), key=lambda item: order[item[0]])}


def evaluate_examples(pipe: TextToImage, examples: Sequence[Example], *, seed: int = 0, batch_size: int | None = None,
                      progress: bool = False, **settings) -> dict:
    """Samples image i of `examples[i].prompt` from (seed, i) (or its candidates, see `TextToImage`) with `pipe`
    and judges it."""
    samples = pipe([e.prompt for e in examples], num_images=1, seed=seed, batch_size=batch_size, progress=progress,
                   **settings)
    return judge_images(examples, samples.images[:, 0])


def evaluate_samples(pipe: TextToImage, *, splits: Sequence[str] = DEFAULT_SPLITS, prompts_file: str | None = None,
                     max_examples: int | None = None, seed: int = 0, batch_size: int | None = None,
                     progress: bool = True, temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None, cond_scale: float | None = None,
                     candidates: int | None = None) -> dict:
    """The report (see the module docstring) on the splits of `pipe`'s work directory, or on `prompts_file`
    instead when it is given. Settings left as None take the pipeline's defaults (the run's config.sampling)."""
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, numbers.Integral)
                                     or max_examples < 1):
        raise ValueError(f"max_examples={max_examples!r} must be an integer >= 1, or None for every example.")
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, cond_scale=cond_scale, candidates=candidates)
    settings = pipe.sampling_settings(**given)
    workdir = pipe.seq2seq.workdir
    if prompts_file is not None:
        sets = {os.path.basename(prompts_file): (prompts_file, read_prompts_file(prompts_file, max_examples))}
    else:
        if isinstance(splits, str) or not splits:
            raise ValueError(f"splits={splits!r} must be a non-empty list of split names, e.g. {DEFAULT_SPLITS}.")
        sets = {split: (f"split {split!r} of {workdir}", split_examples(workdir, split, max_examples))
                for split in splits}
    report = dict(workdir=workdir, step=pipe.seq2seq.step, seed=seed, settings=dataclasses.asdict(settings),
                  scorer=pipe.scorer(settings), sets={})
    if report["scorer"] == "reranker":
        report["reranker"] = pipe.reranker_record(settings)
    for name, (source, examples) in sets.items():
        logging.info("Sampling and judging %d images for %s", len(examples), source)
        result = evaluate_examples(pipe, examples, seed=seed, batch_size=batch_size, progress=progress, **given)
        report["sets"][name] = dict(source=source, **result)
    return report


# ---- the command line ----

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Work directory of a trained seq2seq run.", **fv)
    flags.DEFINE_string("out", None, "Where to write the JSON report.", **fv)
    flags.DEFINE_multi_string("split", list(DEFAULT_SPLITS), "Split of the run's encoded dataset (repeatable).", **fv)
    flags.DEFINE_string("prompts_file", None, "JSONL of {\"prompt\", \"scene\"} lines, evaluated instead of the "
                        "splits.", **fv)
    flags.DEFINE_integer("max_examples", None, "At most this many examples per set (default: all).", **fv)
    flags.DEFINE_integer("seed", 0, "Example i is sampled from (seed, i), or chosen among (seed, iK + c) with "
                         "--candidates K.", **fv)
    flags.DEFINE_float("temperature", None, "Softmax temperature (> 0; default: the run's config.sampling).", **fv)
    flags.DEFINE_integer("top_k", None, "Sample among the k most likely codes (0: all of them; default: the "
                         "run's).", **fv)
    flags.DEFINE_float("top_p", None, "Nucleus mass in (0, 1] (1: off; default: the run's).", **fv)
    flags.DEFINE_float("cond_scale", None, "Guidance scale (1: off; default: the run's).", **fv)
    flags.DEFINE_integer("candidates", None, "Draws per image, of which the best-scoring is kept (>= 1; default: "
                         "the run's).", **fv)
    flags.DEFINE_integer("batch_size", 16, "Images drawn per sampling batch (candidates count each).", **fv)
    flags.DEFINE_string("vqgan_workdir", None, "The VQGAN's work directory (default: the run's "
                        "config.vqgan_workdir).", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).", **fv)
    flags.DEFINE_string("reranker_workdir", None, "A caption model trained for this run (the shapes_captioner "
                        "recipe): with --candidates K > 1 it picks the draw whose picture it finds the prompt "
                        "likeliest for, instead of the seq2seq model's likelihood. Default: the one registered in the "
                        "run's reranker.json, if any; \"\" turns reranking off.", **fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=flag_values)


def run(fv: flags.FlagValues) -> dict:
    """Everything the command does, from parsed flags; returns the report it wrote."""
    if fv.max_examples is not None and fv.max_examples < 1:
        raise app.UsageError(f"--max_examples={fv.max_examples} must be at least 1.")
    if fv.batch_size < 1:
        raise app.UsageError(f"--batch_size={fv.batch_size} must be at least 1.")
    given = dict(temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p, cond_scale=fv.cond_scale,
                 candidates=fv.candidates)
    try:
        SamplingSettings.overrides(**given)  # the run's own defaults are checked when it is loaded
    except ValueError as e:
        raise app.UsageError(f"--{e}") from None
    if fv.prompts_file is not None:
        read_prompts_file(fv.prompts_file, fv.max_examples)
    if fv.reranker_workdir and not storage.isdir(fv.reranker_workdir):
        raise app.UsageError(f"--reranker_workdir={fv.reranker_workdir!r} does not exist; train a caption model "
                             "with the shapes_captioner recipe, leave the flag out for the run's registered one, or "
                             "pass --reranker_workdir=\"\" for none.")
    pipe = TextToImage.from_workdir(fv.workdir, vqgan_workdir=fv.vqgan_workdir, step=fv.step,
                                    batch_size=fv.batch_size, reranker_workdir=fv.reranker_workdir)
    logging.info("Picker: %s.", pipe.describe_picker(pipe.sampling_settings(**given)))
    report = evaluate_samples(pipe, splits=fv.split, prompts_file=fv.prompts_file, max_examples=fv.max_examples,
                              seed=fv.seed, batch_size=fv.batch_size, progress=True, **given)
    report_file.write_report(fv.out, report)
    for name, result in report["sets"].items():
        logging.info("%s: accuracy %.3f (exact %.3f; spec's reading %.3f) over %d images", name, result["accuracy"],
                     result["exact_accuracy"], result["spec_accuracy"], result["count"])
    return report


def main(argv):
    logging.set_verbosity(logging.INFO)
    run(flags.FLAGS)


def cli() -> None:
    """The `dalle-jax-evaluate` command."""
    define_flags()
    command_line.run(main, __name__)


if __name__ == "__main__":
    cli()
