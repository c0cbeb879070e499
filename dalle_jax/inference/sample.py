"""Samples images from a trained seq2seq run.

    dalle-jax-sample --workdir runs/dalle --prompt "a small red circle in the top left" --num_images 16 \
        --out grid.png
    dalle-jax-sample --workdir runs/dalle --prompts_file prompts.txt --num_images 4 --out_dir samples/

`--out` writes one grid picture (a row per prompt); `--out_dir` writes one PNG per image and `samples.jsonl`, a
record per image of its prompt, seed, index, sampling settings, text ids, sampled image ids, score and `scorer`:
"seq2seq" (score = log p(image ids | prompt)) or "reranker" (the caption model's log p(prompt | image); `reranker`
then names its workdir and step). Image i of a run (prompt i // num_images) is drawn from (seed, i) alone; with
`--candidates K` it is the best-scoring of K draws from (seed, i*K + c), picked by the reranker registered for the
run (`reranker.json` in its work directory, written when one finishes training), or the one `--reranker_workdir`
names; `--reranker_workdir=""` picks by the seq2seq model's likelihood. Settings not given take the run's
`config.sampling`.
"""
import json
import os

from absl import app, flags, logging
from PIL import Image

from dalle_jax import command_line, storage
from dalle_jax.inference import compile_cache
from dalle_jax.inference.text_to_image import DEFAULT_BATCH_SIZE, TextToImage
from dalle_jax.inference.sampling import SamplingSettings

SAMPLES_FILE = "samples.jsonl"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Work directory of a trained seq2seq run.", **fv)
    flags.DEFINE_string("prompt", None, "One prompt (\"\" samples unconditionally).", **fv)
    flags.DEFINE_string("prompts_file", None, "A text file of prompts, one per line (blank lines skipped).", **fv)
    flags.DEFINE_integer("num_images", 4, "Images per prompt.", **fv)
    flags.DEFINE_string("out", None, "Where to write the grid PNG (one row per prompt).", **fv)
    flags.DEFINE_string("out_dir", None, "Where to write one PNG per image and samples.jsonl.", **fv)
    flags.DEFINE_integer("seed", 0, "Image i is drawn from (seed, i), or chosen among (seed, iK + c) with "
                         "--candidates K.", **fv)
    flags.DEFINE_float("cond_scale", None, "Guidance scale (1: off; default: the run's config.sampling).", **fv)
    flags.DEFINE_float("temperature", None, "Softmax temperature (> 0; default: the run's).", **fv)
    flags.DEFINE_integer("top_k", None, "Sample among the k most likely codes (0: all of them; default: the "
                         "run's).", **fv)
    flags.DEFINE_float("top_p", None, "Nucleus mass in (0, 1] (1: off; default: the run's).", **fv)
    flags.DEFINE_integer("candidates", None, "Draws per image, of which the best-scoring is kept (>= 1; default: "
                         "the run's).", **fv)
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Images drawn per sampling batch (candidates count "
                         "each).", **fv)
    flags.DEFINE_string("vqgan_workdir", None, "The VQGAN's work directory (default: the run's "
                        "config.vqgan_workdir).", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to sample from (default: the newest).", **fv)
    flags.DEFINE_string("reranker_workdir", None, "A caption model trained for this run (the shapes_captioner "
                        "recipe): with --candidates K > 1 it picks the draw whose picture it finds the prompt "
                        "likeliest for, instead of the seq2seq model's likelihood. Default: the one registered in the "
                        "run's reranker.json, if any; \"\" turns reranking off.", **fv)
    flags.mark_flag_as_required("workdir", flag_values=flag_values)


def read_prompts(fv: flags.FlagValues) -> list[str]:
    if (fv.prompt is None) == (fv.prompts_file is None):
        raise app.UsageError("Give exactly one of --prompt \"...\" and --prompts_file FILE.")
    if fv.prompt is not None:
        return [fv.prompt]
    if not os.path.isfile(fv.prompts_file):
        raise app.UsageError(f"--prompts_file={fv.prompts_file!r} does not exist; write one prompt per line.")
    with open(fv.prompts_file) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise app.UsageError(f"--prompts_file={fv.prompts_file!r} holds no prompts; write one prompt per line.")
    return prompts


def check_flags(fv: flags.FlagValues) -> dict:
    """Fails on bad flags before anything is loaded; returns the sampling settings that were given."""
    if fv.out is None and fv.out_dir is None:
        raise app.UsageError("Nowhere to write the images: give --out grid.png and/or --out_dir DIR.")
    for name in ("num_images", "batch_size"):
        if fv[name].value < 1:
            raise app.UsageError(f"--{name}={fv[name].value} must be at least 1.")
    if fv.reranker_workdir and not storage.isdir(fv.reranker_workdir):
        raise app.UsageError(f"--reranker_workdir={fv.reranker_workdir!r} does not exist; train a caption model "
                             "with the shapes_captioner recipe, leave the flag out for the run's registered one, or "
                             "pass --reranker_workdir=\"\" for none.")
    if not 0 <= fv.seed < 2 ** 32:
        raise app.UsageError(f"--seed={fv.seed} must be in [0, 2**32).")
    given = dict(temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p, cond_scale=fv.cond_scale,
                 candidates=fv.candidates)
    try:
        return SamplingSettings.overrides(**given)  # the run's own defaults are checked when it is loaded
    except ValueError as e:
        raise app.UsageError(f"--{e}") from None


def run(fv: flags.FlagValues):
    """Everything the command does, from parsed flags; returns the `Samples`."""
    prompts = read_prompts(fv)
    settings = check_flags(fv)
    pipe = TextToImage.from_workdir(fv.workdir, vqgan_workdir=fv.vqgan_workdir, step=fv.step,
                                    batch_size=fv.batch_size, reranker_workdir=fv.reranker_workdir)
    logging.info("Picker: %s.", pipe.describe_picker(pipe.sampling_settings(**settings)))
    samples = pipe(prompts, fv.num_images, seed=fv.seed, progress=True, **settings)
    if fv.out is not None:
        storage.makedirs(storage.dirname(storage.abspath(fv.out)))
        with storage.open(fv.out, "wb") as f:
            Image.fromarray(samples.grid()).save(f, format="PNG")
        logging.info("Wrote the grid of %d x %d images to %s", len(prompts), fv.num_images, fv.out)
    if fv.out_dir is not None:
        write_images(samples, fv.out_dir, workdir=pipe.seq2seq.workdir, step=pipe.seq2seq.step)
        logging.info("Wrote %d images and %s to %s", samples.indices.size, SAMPLES_FILE, fv.out_dir)
    return samples


def write_images(samples, out_dir: str, **context) -> None:
    """One PNG per image and `samples.jsonl`; `context` (e.g. the work directory and step) goes in every record."""
    storage.makedirs(out_dir)
    images = samples.images.reshape(-1, *samples.images.shape[2:])
    lines = []
    for image, record in zip(images, samples.records()):
        name = f"{record['index']:05d}.png"
        with storage.open(storage.join(out_dir, name), "wb") as f:
            Image.fromarray(image).save(f, format="PNG")
        lines.append(json.dumps(dict(record, file=name, **context)) + "\n")
    storage.write_atomic(storage.join(out_dir, SAMPLES_FILE), "".join(lines))


def main(argv):
    logging.set_verbosity(logging.INFO)
    logging.info("Compilation cache: %s", compile_cache.enable())
    run(flags.FLAGS)


def cli() -> None:
    """The `dalle-jax-sample` command (`python sample.py` is the same)."""
    define_flags()
    command_line.run(main, __name__)


if __name__ == "__main__":
    cli()
