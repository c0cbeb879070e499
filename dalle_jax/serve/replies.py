"""A request's sampled rows as the reply: PNGs (base64) and the records `sample.py` writes to samples.jsonl."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from dalle_jax.inference.text_to_image import Samples, TextToImage
from dalle_jax.serve.validation import SampleRequest


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def samples_of(pipe: TextToImage, request: SampleRequest, text_ids: np.ndarray, truncated: tuple[bool, ...],
               outputs: tuple[np.ndarray, ...]) -> Samples:
    """The `Samples` that `pipe(request.prompts, ...)` returns, from the rows `generate` gave for the request."""
    codes, images, scores, draws = outputs
    shape = (len(request.prompts), request.num_images)
    settings = request.settings
    return Samples(prompts=request.prompts, images=images.reshape(*shape, *images.shape[1:]),
                   image_ids=codes.reshape(*shape, codes.shape[-1]), text_ids=text_ids,
                   uncond_text_ids=pipe.seq2seq.empty_text_ids if settings.guided else None, seed=request.seed,
                   settings=settings, truncated=truncated, scores=scores.reshape(shape), draws=draws.reshape(shape),
                   scorer=pipe.scorer(settings), reranker=pipe.reranker_record(settings))


def reply(pipe: TextToImage, samples: Samples) -> dict:
    """{"images": [{"png", "record"}], "grid_png", "truncated"}: each record as a line of samples.jsonl."""
    images = samples.images.reshape(-1, *samples.images.shape[2:])
    context = dict(workdir=pipe.seq2seq.workdir, step=pipe.seq2seq.step)
    return dict(images=[dict(png=png_base64(image), record=dict(record, file=f"{record['index']:05d}.png", **context))
                        for image, record in zip(images, samples.records())],
                grid_png=png_base64(samples.grid()), truncated=list(samples.truncated))
