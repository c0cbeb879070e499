"""The HTTP side: the page at `/`, `POST /api/samples`, `GET /api/config` and `GET /health`, on one loaded
`TextToImage` whose sampler calls a `Batcher` shares among the requests."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import json
import logging
import warnings

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from dalle_jax.inference.text_to_image import TextToImage
from dalle_jax.serve import replies, validation
from dalle_jax.serve.batcher import Batcher, Busy, Job

# How often a waiting request checks that its client is still there, and a streaming one reports progress.
POLL_SECONDS = 0.05
PROGRESS_SECONDS = 0.2


def create_app(pipe: TextToImage, *, limits: validation.Limits, max_wait_s: float = 0.05,
               max_queued_images: int = 256) -> Starlette:
    limits = dataclasses.replace(limits, image_vocab_size=int(pipe.seq2seq.config.model.image_vocab_size))
    batcher = Batcher(pipe, max_wait_s=max_wait_s, max_queued_images=max_queued_images)
    page = importlib.resources.files("dalle_jax.serve").joinpath("page.html").read_text()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(_warm_up_then_serve(batcher, pipe.default_settings))
        yield
        worker.cancel()

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        return JSONResponse(dict(
            status="ok", workdir=pipe.seq2seq.workdir, step=pipe.seq2seq.step,
            compiled=batcher.compiled(pipe.default_settings), sampling=batcher.sampling,
            queued_requests=batcher.queued_requests, queued_images=batcher.queued_images,
            batch_size=pipe.batch_size, max_wait_ms=round(max_wait_s * 1000), **batcher.counts))

    async def config(request: Request):
        return JSONResponse(dict(workdir=pipe.seq2seq.workdir, step=pipe.seq2seq.step,
                                 defaults=dataclasses.asdict(pipe.default_settings),
                                 limits=dataclasses.asdict(limits), text_length=pipe.text_length,
                                 image_size=pipe.image_size))

    async def samples(request: Request):
        try:
            parsed = validation.parse(await request.body(), pipe.default_settings, limits)
        except validation.BadRequest as e:
            return JSONResponse(e.as_json(), status_code=e.status)
        with warnings.catch_warnings():  # a truncated prompt is reported in the reply
            warnings.simplefilter("ignore")
            text_ids, truncated = pipe.encode_prompts(parsed.prompts)
        try:
            job = batcher.submit(np.repeat(text_ids, parsed.num_images, axis=0), parsed.seed, parsed.settings)
        except Busy as e:
            return JSONResponse(dict(error=dict(field=None, message=str(e))), status_code=503)

        def finish(outputs) -> dict:
            return replies.reply(pipe, replies.samples_of(pipe, parsed, text_ids, truncated, outputs))

        if request.query_params.get("stream") in ("1", "true"):
            return StreamingResponse(_stream(batcher, job, finish), media_type="application/x-ndjson")
        outputs = await _wait_unless_gone(request, batcher, job)
        if outputs is None:
            return JSONResponse(dict(error=dict(field=None, message="cancelled")), status_code=499)
        if isinstance(outputs, Exception):
            return JSONResponse(dict(error=dict(field=None, message=f"Sampling failed: {outputs}")), status_code=500)
        return JSONResponse(await asyncio.to_thread(finish, outputs))

    return Starlette(routes=[Route("/", index), Route("/health", health), Route("/api/config", config),
                             Route("/api/samples", samples, methods=["POST"])], lifespan=lifespan)


async def _warm_up_then_serve(batcher: Batcher, settings) -> None:
    try:
        await batcher.warm_up(settings)
        logging.info("The sampler is compiled; serving.")
    except Exception:  # noqa: BLE001 -- requests still get served (and see the error themselves)
        logging.exception("Compiling the sampler failed.")
    await batcher.run_forever()


async def _wait_unless_gone(request: Request, batcher: Batcher, job: Job):
    """The job's outputs; None if its client disconnected first (the job is then cancelled); the exception if
    sampling failed."""
    try:
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(job.future), POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    batcher.cancel(job)
                    return None
            except asyncio.CancelledError:
                if job.cancelled:
                    return None
                raise
            except Exception as e:  # noqa: BLE001
                return e
    finally:
        if not job.future.done():
            batcher.cancel(job)


async def _stream(batcher: Batcher, job: Job, finish):
    """NDJSON lines: {"progress": ...} while the job waits and samples, then {"result": ...} or {"error": ...}.
    Starlette cancels this generator when the client disconnects, which cancels the job."""
    try:
        while not job.future.done():
            yield json.dumps(dict(progress=batcher.progress(job))) + "\n"
            await asyncio.wait([job.future], timeout=PROGRESS_SECONDS)
        if job.future.cancelled():
            return
        if job.future.exception() is not None:
            yield json.dumps(dict(error=dict(field=None, message=f"Sampling failed: {job.future.exception()}"))) + "\n"
            return
        yield json.dumps(dict(result=await asyncio.to_thread(finish, job.future.result()))) + "\n"
    finally:
        batcher.cancel(job)
