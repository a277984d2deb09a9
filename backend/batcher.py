"""The request queue and the one inference worker: dynamic batching, priority with aging, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from backend.capacity import DrainRate
from backend.errors import InferenceFailed, Overloaded, Withdrawn
from backend.metrics import BackendMetrics
from backend.scheduling import BatchKey, Job, pick_batch, retry_after_s
from backend.validation import MAX_SEED, GenerationRequest

__all__ = ["Batcher", "BatcherSettings", "Runner"]

# runner(prompts, seeds, (width, height), steps, pad_to) -> one PNG per prompt; runs on the worker thread.
Runner = Callable[[Sequence[str], Sequence[int], tuple[int, int], int, int], list[bytes]]


@dataclass(frozen=True, kw_only=True)
class BatcherSettings:
    max_batch_images: int = 8
    max_wait_s: float = 0.010
    max_queue_images: int = 64
    max_queue_wait_s: float = 30.0
    aging_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch_images < 1:
            raise ValueError("max_batch_images must be at least 1 (1 turns batching off)")
        if self.max_queue_images < 1:
            raise ValueError("max_queue_images must be at least 1")
        if self.max_wait_s < 0 or self.max_queue_wait_s <= 0 or self.aging_s <= 0:
            raise ValueError("max_wait_s must be >= 0; max_queue_wait_s and aging_s must be > 0")


class Batcher:
    """Queue requests; one worker runs compatible ones together on `executor` (a single thread)."""

    def __init__(
        self,
        runner: Runner,
        executor: Executor,
        metrics: BackendMetrics,
        settings: BatcherSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._runner = runner
        self._executor = executor
        self._metrics = metrics
        self.settings = settings
        self._clock = clock
        self._jobs: list[Job] = []
        self._seq = 0
        self._running_images = 0
        self._arrived = asyncio.Event()
        self._depth: Counter[int] = Counter()
        self.throughput = DrainRate()

    @property
    def queued_images(self) -> int:
        return sum(job.images for job in self._jobs)

    @property
    def running_images(self) -> int:
        """Images of the batch the worker is running now; 0 while it waits."""
        return self._running_images

    @property
    def queued(self) -> list[Job]:
        return list(self._jobs)

    def submit(self, request: GenerationRequest) -> Job:
        """Queue `request`, or raise Overloaded at once when the queue or the expected wait is too long."""
        queued = self.queued_images
        ahead = queued + self._running_images
        if queued + request.n > self.settings.max_queue_images:
            self._reject("queue_full", "The generation queue is full; retry later.", ahead)
        wait = self.throughput.seconds_for(ahead + request.n)
        if wait is not None and wait > self.settings.max_queue_wait_s:
            self._reject("queue_wait", f"Expected queue wait of {wait:.0f}s is too long; retry later.", ahead)
        first = secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed
        job = Job(
            request=request,
            seeds=tuple(first + i for i in range(request.n)),
            enqueued_at=self._clock(),
            seq=self._seq,
            future=asyncio.get_running_loop().create_future(),
        )
        self._seq += 1
        self._jobs.append(job)
        self._count(job, +1)
        self._arrived.set()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job whose client went away; True when it was still queued (so it costs no inference)."""
        if not job.future.done():
            job.future.cancel()
        if job not in self._jobs:
            return False
        self._jobs.remove(job)
        self._count(job, -1)
        self._metrics.cancelled.inc()
        return True

    def withdraw(self, job: Job) -> bool:
        """Take `job` out of the queue before it starts; False if a batch has already taken it (it runs on).

        A batch removes its jobs from the queue before any await, so a job is either queued or started.
        """
        if job not in self._jobs:
            return False
        self._jobs.remove(job)
        self._count(job, -1)
        self._metrics.withdrawn.inc()
        if not job.future.done():
            job.future.set_exception(Withdrawn())
        return True

    async def run(self) -> None:
        """The worker loop: wait for jobs, gather a batch, run it off the event loop, hand results back."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = await self._next_batch()
                await self._run_batch(loop, batch)
        finally:
            for job in self._jobs:
                job.future.cancel()

    async def _next_batch(self) -> list[Job]:
        while True:
            while not self._jobs:
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._pick()
            # Hold a partial batch until its oldest job has waited max_wait_s, so that requests arriving
            # together run together; jobs that queued up behind a running batch do not wait again.
            while batch and self._images(batch) < self.settings.max_batch_images:
                oldest = min(job.enqueued_at for job in batch)
                remaining = oldest + self.settings.max_wait_s - self._clock()
                if remaining <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                batch = self._pick()
            if batch:
                return batch

    def _pick(self) -> list[Job]:
        return pick_batch(
            self._jobs, self._clock(), max_images=self.settings.max_batch_images, aging_s=self.settings.aging_s
        )

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        now = self._clock()
        for job in batch:
            self._jobs.remove(job)
            self._count(job, -1)
            self._metrics.queue_wait_seconds.observe(max(now - job.enqueued_at, 0.0))
        images = self._images(batch)
        self._running_images = images
        try:
            pngs = await loop.run_in_executor(self._executor, self._generate, batch)
        except asyncio.CancelledError:
            # The worker is stopping: the handlers waiting on this batch answer 503 instead of hanging.
            for job in batch:
                job.future.cancel()
            raise
        except Exception as exc:
            self._metrics.failures.inc()
            for job in batch:
                if not job.future.done():
                    failure = InferenceFailed()
                    failure.__cause__ = exc
                    job.future.set_exception(failure)
            return
        finally:
            self._running_images = 0
        self.throughput.observe(images, self._clock() - now)
        self._metrics.drain_rate.set(self.throughput.images_per_s)
        self._metrics.images_generated.inc(images)
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(pngs[start : start + job.images])
            start += job.images

    def _generate(self, batch: list[Job]) -> list[bytes]:
        """On the worker thread: split into calls of at most max_batch_images and run them in order."""
        key: BatchKey = batch[0].key
        prompts = [job.request.prompt for job in batch for _ in job.seeds]
        seeds = [seed for job in batch for seed in job.seeds]
        # Seeded requests must not depend on the batch they land in: give their calls one fixed shape.
        pad_to = self.settings.max_batch_images if any(job.request.seed is not None for job in batch) else 0
        size = (key.width, key.height)
        step = self.settings.max_batch_images
        pngs: list[bytes] = []
        for start in range(0, len(prompts), step):
            chunk = slice(start, start + step)
            began = time.perf_counter()
            pngs.extend(self._runner(prompts[chunk], seeds[chunk], size, key.steps, pad_to))
            self._metrics.generation_seconds.observe(time.perf_counter() - began)
            self._metrics.batch_images.observe(len(prompts[chunk]))
        return pngs

    @staticmethod
    def _images(batch: Sequence[Job]) -> int:
        return sum(job.images for job in batch)

    def _count(self, job: Job, delta: int) -> None:
        priority = job.request.priority
        self._depth[priority] += delta
        self._metrics.queue_depth.labels(priority=str(priority)).set(self._depth[priority])
        self._metrics.queued_images.set(self.queued_images)

    def _reject(self, reason: str, message: str, images_ahead: int) -> None:
        self._metrics.rejections.labels(reason=reason).inc()
        raise Overloaded(message, reason=reason, retry_after_s=retry_after_s(images_ahead, self.throughput))
