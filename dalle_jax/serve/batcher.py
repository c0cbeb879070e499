"""Requests that arrive together, sampled in one call of the loaded model.

Each request becomes a `Job`: its images' text rows, its seed and its images' indices 0..n-1. The worker takes the
oldest job, waits up to `max_wait_s` for others with the same sampling settings (one compiled program serves them),
and hands as many as fit in one sampler call (`capacity` images) to `TextToImage.generate` with one seed and one
index per row, so every image is the one its request alone, or `sample.py`, draws from (seed, index). Groups are
padded to the next of a few sizes (powers of two up to `capacity`, then whole sampler calls), so each settings'
program compiles for those shapes only, and a lone small request does not pay for a full batch. A job whose
client went away leaves the queue at once; one already being sampled has its images dropped.

The token loop runs inside one compiled scan, which reports nothing until it ends (a host callback in it would make
the program uncacheable across restarts), so a job's progress is estimated from the time per token that the last
calls measured.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time

import numpy as np

from dalle_jax import parallel
from dalle_jax.inference.sampling import SamplingSettings
from dalle_jax.inference.text_to_image import TextToImage


class Busy(RuntimeError):
    """The queue is full; the client should retry later."""


@dataclasses.dataclass(eq=False)
class Job:
    text_ids: np.ndarray  # (images, text_length): one row per image, prompt i // num_images
    seed: int
    settings: SamplingSettings
    future: asyncio.Future
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    started: float | None = None  # when its sampler call began
    tokens_total: int = 0  # tokens of the sampler calls it is in
    call_rows: int = 0  # the batch size of those calls
    cancelled: bool = False

    @property
    def size(self) -> int:
        return len(self.text_ids)


def _program(settings: SamplingSettings) -> tuple:
    """What decides the compiled sampler: settings that differ only in temperature, top_p < 1 or guidance scale
    share it."""
    return settings.top_k, settings.guided, settings.top_p < 1.0, settings.candidates


class Batcher:
    def __init__(self, pipe: TextToImage, *, max_wait_s: float = 0.05, max_queued_images: int = 256):
        self.pipe, self.max_wait_s, self.max_queued_images = pipe, max_wait_s, max_queued_images
        self._queue: list[Job] = []
        self._changed = asyncio.Event()
        # One thread: one sampler call at a time, in order.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self._compiled: set[tuple] = set()  # (program, rows per call)
        self._seconds_per_token: dict[tuple, float] = {}
        self.sampling = False
        self.counts = dict(sampler_calls=0, requests_served=0, cancelled=0)

    def capacity(self, settings: SamplingSettings) -> int:
        """Images per sampler call: `pipe.batch_size` draws (a whole number per device on the batch axes)."""
        ways = parallel.batch_parallelism(self.pipe.mesh)
        return -(-max(self.pipe.batch_size // settings.candidates, 1) // ways) * ways

    def sizes(self, settings: SamplingSettings) -> list[int]:
        """The batch sizes sampled under `settings`: powers of two times the devices on the batch axes, and
        `capacity`."""
        ways, capacity = parallel.batch_parallelism(self.pipe.mesh), self.capacity(settings)
        sizes = [ways]
        while sizes[-1] * 2 < capacity:
            sizes.append(sizes[-1] * 2)
        return sorted(set(sizes + [capacity]))

    def padded(self, rows: int, settings: SamplingSettings) -> int:
        capacity = self.capacity(settings)
        if rows >= capacity:
            return -(-rows // capacity) * capacity
        return min(size for size in self.sizes(settings) if size >= rows)

    def compiled(self, settings: SamplingSettings, rows: int | None = None) -> bool:
        """Whether the sampler for `settings` is compiled for batches of `rows` (None: for every size)."""
        wanted = self.sizes(settings) if rows is None else [min(rows, self.capacity(settings))]
        return all((_program(settings), size) in self._compiled for size in wanted)

    @property
    def queued_images(self) -> int:
        return sum(job.size for job in self._queue)

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    def submit(self, text_ids: np.ndarray, seed: int, settings: SamplingSettings) -> Job:
        if self.queued_images + len(text_ids) > self.max_queued_images:
            raise Busy(f"{self.queued_images} images are queued already (the limit is {self.max_queued_images}); "
                       "retry in a moment.")
        job = Job(text_ids, seed, settings, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._changed.set()
        return job

    def cancel(self, job: Job) -> None:
        """The job's client went away: it leaves the queue (or its images, once sampled, are dropped)."""
        if job.cancelled or job.future.done():
            return
        job.cancelled = True
        self.counts["cancelled"] += 1
        if job in self._queue:
            self._queue.remove(job)
            self._changed.set()
        job.future.cancel()

    def progress(self, job: Job) -> dict:
        """{"state": "queued" | "compiling" | "sampling", "tokens_done", "tokens_total"}; tokens_done is estimated
        from the measured time per token (None before any was measured)."""
        if job.started is None:
            ahead = sum(other.size for other in self._queue[:self._queue.index(job)]) if job in self._queue else 0
            return dict(state="queued", images_ahead=ahead, tokens_done=0, tokens_total=job.tokens_total)
        seconds = self._seconds_per_token.get((_program(job.settings), job.call_rows))
        if seconds is None:
            compiled = self.compiled(job.settings, job.call_rows)
            return dict(state="sampling" if compiled else "compiling", tokens_done=None,
                        tokens_total=job.tokens_total)
        done = int((time.monotonic() - job.started) / seconds)
        return dict(state="sampling", tokens_done=min(done, job.tokens_total - 1), tokens_total=job.tokens_total)

    async def warm_up(self, settings: SamplingSettings) -> None:
        """Compiles the sampler for `settings` at every batch size."""
        for size in self.sizes(settings):
            rows = np.tile(self.pipe.seq2seq.empty_text_ids, (size, 1))
            await self._run(rows, np.zeros(size, np.int64), np.arange(size), settings)

    async def run_forever(self) -> None:
        while True:
            group = await self._next_group()
            if group:
                await self._sample(group)

    async def _next_group(self) -> list[Job]:
        while not self._queue:
            self._changed.clear()
            await self._changed.wait()
        first = self._queue[0]
        capacity = self.capacity(first.settings)
        while True:
            group, size = [first], first.size
            for job in self._queue[1:]:
                if job.settings == first.settings and size + job.size <= capacity:
                    group.append(job)
                    size += job.size
            remaining = first.arrived + self.max_wait_s - time.monotonic()
            if size >= capacity or remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
            if first not in self._queue:  # its client went away while it waited
                return []
        for job in group:
            self._queue.remove(job)
        return group

    async def _sample(self, group: list[Job]) -> None:
        settings, capacity = group[0].settings, self.capacity(group[0].settings)
        rows = sum(job.size for job in group)
        padded = self.padded(rows, settings)
        text_ids = np.tile(self.pipe.seq2seq.empty_text_ids, (padded, 1))
        text_ids[:rows] = np.concatenate([job.text_ids for job in group])
        seeds, indices = np.zeros(padded, np.int64), np.zeros(padded, np.int64)
        seeds[:rows] = np.concatenate([np.full(job.size, job.seed) for job in group])
        indices[:rows] = np.concatenate([np.arange(job.size) for job in group])
        started = time.monotonic()
        for job in group:
            job.started, job.call_rows = started, min(padded, capacity)
            job.tokens_total = -(-padded // capacity) * self.pipe.seq2seq.config.model.image_length
        self.sampling = True
        try:
            outputs = await self._run(text_ids, seeds, indices, settings)
        except Exception as e:  # noqa: BLE001 -- handed to every waiting request, and the server keeps serving
            for job in group:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        finally:
            self.sampling = False
        start = 0
        for job in group:
            part = tuple(output[start:start + job.size] for output in outputs)
            start += job.size
            if not job.future.done():
                job.future.set_result(part)
                self.counts["requests_served"] += 1

    async def _run(self, text_ids, seeds, indices, settings) -> tuple[np.ndarray, ...]:
        """One `generate` call on the sampler thread; records what it compiled and how long a token took."""
        call_rows = min(len(text_ids), self.capacity(settings))
        key, was_compiled = (_program(settings), call_rows), self.compiled(settings, call_rows)
        started = time.monotonic()
        outputs = await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self.pipe.generate(text_ids, seeds, settings, indices=indices))
        calls = -(-len(text_ids) // call_rows)
        if was_compiled:
            self._seconds_per_token[key] = ((time.monotonic() - started)
                                            / (calls * self.pipe.seq2seq.config.model.image_length))
        self._compiled.add(key)
        self.counts["sampler_calls"] += calls
        return outputs
