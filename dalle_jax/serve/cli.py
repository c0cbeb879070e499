"""Serves a trained seq2seq run: a web page at / and a JSON API at /api/samples, on one loaded model.

    dalle-jax-serve --workdir runs/dalle [--reranker_workdir DIR] [--host 127.0.0.1 --port 8000]
    python -m dalle_jax.serve --workdir runs/dalle

The run is loaded once and its sampler compiled once, at start (`GET /health` says when); compiled programs go to a
persistent cache in the user's cache directory, so a restart (and `dalle-jax-sample`) skips them. Requests that
arrive within --max_wait_ms of each other with the same settings are sampled together, up to --batch_size draws per
sampler call; each image is the one `dalle-jax-sample` gives for the same prompt, seed and index. See
docs/serving.md.
"""
from absl import app, flags, logging

from dalle_jax import command_line
from dalle_jax.inference import compile_cache
from dalle_jax.inference.text_to_image import DEFAULT_BATCH_SIZE, TextToImage

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Work directory of a trained seq2seq run.", **fv)
    flags.DEFINE_string("reranker_workdir", None, "A caption model trained for this run to pick among candidates. "
                        "Default: the one registered in the run's reranker.json, if any; \"\" turns reranking off.",
                        **fv)
    flags.DEFINE_string("vqgan_workdir", None, "The VQGAN's work directory (default: the run's "
                        "config.vqgan_workdir).", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to serve (default: the newest).", **fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; 0.0.0.0 serves other machines too.", **fv)
    flags.DEFINE_integer("port", 8000, "Port to listen on.", **fv)
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Draws per sampler call (candidates count each): "
                         "requests waiting together fill it.", **fv)
    flags.DEFINE_float("max_wait_ms", 50, "How long the oldest waiting request waits for others to share its "
                       "sampler call.", **fv)
    flags.DEFINE_integer("max_images", 16, "Most images (prompts x num_images) one request may ask for.", **fv)
    flags.DEFINE_integer("max_prompt_chars", 256, "Longest prompt accepted, in characters.", **fv)
    flags.DEFINE_integer("max_candidates", 16, "Most candidates per image a request may ask for.", **fv)
    flags.DEFINE_integer("max_queued_images", 256, "Images that may wait at once; more get 503 Busy.", **fv)
    flags.mark_flag_as_required("workdir", flag_values=flag_values)


def check_flags(fv: flags.FlagValues) -> None:
    for name in ("batch_size", "max_images", "max_prompt_chars", "max_candidates", "max_queued_images"):
        if fv[name].value < 1:
            raise app.UsageError(f"--{name}={fv[name].value} must be at least 1.")
    if fv.max_wait_ms < 0:
        raise app.UsageError(f"--max_wait_ms={fv.max_wait_ms} must be >= 0.")
    if not 0 <= fv.port < 65536:
        raise app.UsageError(f"--port={fv.port} must be in [0, 65535].")


def main(argv):
    import uvicorn

    from dalle_jax.serve import validation
    from dalle_jax.serve.app import create_app

    fv = FLAGS
    check_flags(fv)
    logging.set_verbosity(logging.INFO)
    logging.info("Compilation cache: %s", compile_cache.enable())
    pipe = TextToImage.from_workdir(fv.workdir, vqgan_workdir=fv.vqgan_workdir, step=fv.step,
                                    batch_size=fv.batch_size, reranker_workdir=fv.reranker_workdir)
    limits = validation.Limits(max_images=fv.max_images, max_prompt_chars=fv.max_prompt_chars,
                               max_candidates=fv.max_candidates)
    application = create_app(pipe, limits=limits, max_wait_s=fv.max_wait_ms / 1000,
                             max_queued_images=fv.max_queued_images)
    logging.info("Serving %s (step %d) on http://%s:%d/", fv.workdir, pipe.seq2seq.step, fv.host, fv.port)
    uvicorn.run(application, host=fv.host, port=fv.port, log_level="warning")


def cli() -> None:
    """The `dalle-jax-serve` command (`python -m dalle_jax.serve` is the same)."""
    define_flags()
    command_line.run(main, __name__)
