"""The whole pipeline in one command (`make demo`): data, VQGAN, tokenizer + DalleBart, samples, judged report.

    python -m dalle_jax.demo [--root runs/demo] [--max_examples 500]

Stages: build captioned_shapes -> train the VQGAN (`ROOT/vqgan`) -> train the text tokenizer and DalleBart
(`ROOT/dalle`) -> train the caption model that picks among each image's candidates (`ROOT/reranker`) -> sample a
grid for fixed prompts, held-out colour/shape pairs included (`ROOT/samples.png`) -> sample and judge the validation
splits (what choices are made on) and the test splits (what is reported) -> `ROOT/report.json`; then it prints where
those are and commands to try next. The reranker registers itself in `ROOT/dalle`, so `dalle-jax-sample --workdir
ROOT/dalle` picks with it too. A stage that finished in an earlier run is reused (the report marks it, and times
only this run; pictures and judgements are made again when the recipe's sampling settings changed); a stage that was
interrupted resumes from its checkpoint. A run trained with an older recipe, or from a run that is trained again, is
moved aside and trained afresh (`demo/reuse.py`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import time

from absl import flags

from dalle_jax import command_line
from dalle_jax.configs import shapes_captioner, shapes_dalle, shapes_vqgan
from dalle_jax.demo import reuse

_ROOT = flags.DEFINE_string("root", "runs/demo", "Directory of the demo's work directories and outputs.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 500, "Examples judged per split (at most the split's size).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every stage's training (parameters, data order, draws); runs of "
                             "one recipe that differ only in it spread by several points.")

# One row each; the last three use colour/shape pairs that never occur in training.
DEMO_PROMPTS = (
    "a small red circle in the top left",
    "a large blue square in the center",
    "a yellow triangle to the left of a red square",
    "a large green triangle in the bottom right",
    "a purple circle above a blue triangle",
    "a orange square below a yellow circle",  # the dataset writes "a" before every colour
)
IMAGES_PER_PROMPT = 8
# What the demo writes in ROOT besides the work directories.
SAMPLES_FILE, REPORT_FILE, JUDGED_FILE = "samples.png", "report.json", "judged.json"
SETTINGS_FILE = "samples_settings.json"  # the sampling settings samples.png was drawn with
# The validation splits are what recipe and sampling choices are made on; the test splits report the result.
JUDGED_SPLITS = ("validation", "validation_compositional", "test", "test_compositional")


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


class Stages:
    """Runs each stage an earlier run has not finished, and times the ones it runs: the report's times are of this
    run alone, never summed over runs."""

    def __init__(self):
        self.start = time.perf_counter()
        self.timings: dict[str, float | None] = {}  # None: reused from an earlier run

    def run(self, name: str, done: bool, work) -> None:
        if done:
            logging.info("demo: %s already done in an earlier run; reused", name)
            self.timings[name] = None
            return
        logging.info("demo: %s", name)
        start = time.perf_counter()
        work()
        self.timings[name] = time.perf_counter() - start

    def record(self) -> dict:
        """This run's wall time, each stage's time (null: reused), and whether every stage ran in it."""
        return dict(wall=time.perf_counter() - self.start, stages=dict(self.timings),
                    from_empty=all(t is not None for t in self.timings.values()))


def run_demo(root: str, max_examples: int, seed: int = 0) -> dict:
    from dalle_jax.data import sources
    from dalle_jax.trainers import captioner_trainer as captioner, seq2seq_trainer as seq2seq, vqgan_trainer as vqgan

    os.makedirs(root, exist_ok=True)
    vqgan_dir, dalle_dir = os.path.join(root, "vqgan"), os.path.join(root, "dalle")
    reranker_dir = os.path.join(root, "reranker")
    vqgan_config = shapes_vqgan.get_config()
    dalle_config = shapes_dalle.get_config()
    dalle_config.vqgan_workdir = vqgan_dir
    reranker_config = shapes_captioner.get_config()
    reranker_config.seq2seq_workdir = dalle_dir
    for config in (vqgan_config, dalle_config, reranker_config):
        config.seed = seed
    stages = Stages()

    stages.run("data", sources.builder_for(vqgan_config.data).is_prepared(),
               lambda: sources.prepare(vqgan_config.data))
    # A run of an older recipe, or one that learned from a run that trains again, is moved aside, not resumed.
    vqgan_kept = reuse.keep_or_move_aside(vqgan_dir, vqgan_config)
    dalle_kept = reuse.keep_or_move_aside(dalle_dir, dalle_config, upstream_kept=vqgan_kept)
    reranker_kept = reuse.keep_or_move_aside(reranker_dir, reranker_config, upstream_kept=dalle_kept)
    stages.run("vqgan", vqgan_kept, lambda: vqgan.train(vqgan_config, vqgan_dir))
    stages.run("seq2seq", dalle_kept, lambda: seq2seq.train(dalle_config, dalle_dir))
    stages.run("reranker", reranker_kept, lambda: captioner.train(reranker_config, reranker_dir))
    from dalle_jax import runs
    if not os.path.exists(os.path.join(dalle_dir, runs.RERANKER_FILE)):  # kept from before rerankers registered
        runs.register_reranker(dalle_dir, reranker_dir, reranker_config.num_steps)

    from dalle_jax.shapes import evaluate_samples
    from dalle_jax.inference.text_to_image import TextToImage
    from dalle_jax.inference.sampling import SamplingSettings
    from PIL import Image

    pipe = None
    settings = SamplingSettings.from_config(dalle_config.sampling)
    settings_path = os.path.join(root, SETTINGS_FILE)

    def load():
        nonlocal pipe
        # The recipe's sampling settings, also for a model trained before they changed (its config keeps the old).
        # 512 draws per call: 64 images of 8 candidates, so the grid (48 images) and the 500 prompts of a split (8
        # calls) share one compiled shape.
        pipe = pipe or TextToImage.from_workdir(dalle_dir, batch_size=512, reranker_workdir=reranker_dir,
                                                default_settings=settings)
        return pipe

    def draw_grid():
        Image.fromarray(load()(list(DEMO_PROMPTS), num_images=IMAGES_PER_PROMPT, seed=0).grid()).save(samples_path)
        _write_json(settings_path, dataclasses.asdict(settings))

    # Pictures made before the reranker was (re)trained, or with other sampling settings, are made again.
    reranker_done = os.path.getmtime(os.path.join(reranker_dir, "test_metrics.json"))
    samples_path = os.path.join(root, SAMPLES_FILE)
    stages.run("samples", up_to_date(samples_path, reranker_done, _read_json(settings_path), settings), draw_grid)
    judged_path = os.path.join(root, JUDGED_FILE)
    judged_before = _read_json(judged_path) or {}
    stages.run("evaluate", up_to_date(judged_path, reranker_done, judged_before.get("settings"), settings)
               and set(JUDGED_SPLITS) <= set(judged_before["sets"]), lambda: _write_json(
        judged_path, evaluate_samples.evaluate_samples(load(), splits=JUDGED_SPLITS, max_examples=max_examples,
                                                       progress=True)))

    report = _report(stages.record(), vqgan_dir, dalle_dir, reranker_dir, _read_json(judged_path))
    _write_json(os.path.join(root, REPORT_FILE), report)
    return report


def up_to_date(path: str, than: float, recorded_settings: dict | None, settings) -> bool:
    """Whether the output `path` was made after time `than` (the reranker's training) with `settings`."""
    return (os.path.exists(path) and os.path.getmtime(path) > than
            and recorded_settings == dataclasses.asdict(settings))


def next_steps(root: str, max_examples: int) -> str:
    """Where the demo's picture and report are, and three commands to try next, with the demo's paths."""
    from dalle_jax import runs

    dalle, reranker = os.path.join(root, "dalle"), os.path.join(root, "reranker")
    return "\n".join([
        f"Samples (a row per prompt, the last three colour/shape pairs never seen in training): "
        f"{os.path.join(root, SAMPLES_FILE)}",
        f"Report: {os.path.join(root, REPORT_FILE)} (each judged image: {os.path.join(root, JUDGED_FILE)})",
        "",
        "Try next:" + ("" if shutil.which("dalle-jax-sample") else
                       f" (the commands are in {os.path.dirname(sys.executable)}: `source "
                       f"{os.path.join(os.path.dirname(sys.executable), 'activate')}` first)"),
        f"  # your own prompt; the reranker {reranker} picks each image among its candidates (registered in "
        f"{os.path.join(dalle, runs.RERANKER_FILE)})",
        f"  dalle-jax-sample --workdir {shlex.quote(dalle)} --prompt {shlex.quote(DEMO_PROMPTS[0])} "
        "--out my_grid.png",
        "  # the same judged evaluation without the reranker, to see what it adds",
        f"  dalle-jax-evaluate --workdir {shlex.quote(dalle)} --reranker_workdir= --max_examples {max_examples} "
        f"--out {shlex.quote(os.path.join(root, 'judged_without_reranker.json'))}",
        "  # a VQGAN on your own images, the first stage of your own model",
        "  dalle-jax-train --config images_vqgan --workdir runs/my_vqgan --config.data.folder=/path/to/images",
    ])


def _report(timings: dict, vqgan_dir: str, dalle_dir: str, reranker_dir: str, judged: dict) -> dict:
    vq = _read_json(os.path.join(vqgan_dir, "test_metrics.json"))
    s2s = _read_json(os.path.join(dalle_dir, "test_metrics.json"))
    reranker = _read_json(os.path.join(reranker_dir, "test_metrics.json"))
    judge = {}
    for split, result in judged["sets"].items():
        judge[split] = dict(accuracy=result["accuracy"], count=result["count"],
                            **{name: a["accuracy"] for name, a in result["attributes"].items()})
        for figure in ("exact_accuracy", "spec_accuracy"):  # absent from judged.json files before the strict judge
            if figure in result:
                judge[split][figure] = result[figure]
                judge[split][f"{figure}_by_attribute"] = {name: a[figure] for name, a in result["attributes"].items()}
        if "one_object_pairs" in result:  # absent from the judged.json of a demo run before it was reported
            judge[split]["one_object_pairs"] = {pair: dict(accuracy=p["accuracy"], count=p["count"])
                                                for pair, p in result["one_object_pairs"].items()}
    return dict(
        timings_s=timings,
        vqgan=dict(psnr=vq["psnr"], codebook_usage=vq["codebook_usage"]),
        seq2seq=dict(eval_loss=s2s["loss"], token_accuracy=s2s["token_accuracy"], perplexity=s2s["perplexity"]),
        reranker=dict(eval_loss=reranker["loss"], twin_accuracy=reranker.get("twin_accuracy")),
        judge=judge, sampling=dict(judged["settings"], scorer=judged.get("scorer", "seq2seq")))


def main(argv):
    logging.getLogger().setLevel(logging.INFO)
    report = run_demo(_ROOT.value, _MAX_EXAMPLES.value, _SEED.value)
    print(json.dumps(report, indent=2))
    print(next_steps(_ROOT.value, _MAX_EXAMPLES.value))



def cli() -> None:
    """The `dalle-jax-demo` command."""
    command_line.run(main, __name__)
