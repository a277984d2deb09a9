"""Pure scheduling policy: which queued jobs run next (priority with aging), and how long a wait is."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from backend.capacity import DrainRate
from backend.validation import GenerationRequest

__all__ = ["BatchKey", "Job", "effective_priority", "pick_batch", "retry_after_s"]

MAX_RETRY_AFTER_S = 3600


@dataclass(frozen=True)
class BatchKey:
    """Requests run together only when all of these agree."""

    width: int
    height: int
    steps: int


@dataclass(eq=False)
class Job:
    """A queued request: its seeds (one per image), when it arrived, and where its PNGs go."""

    request: GenerationRequest
    seeds: tuple[int, ...]
    enqueued_at: float
    seq: int
    future: asyncio.Future[list[bytes]] = field(repr=False)

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.request.width, self.request.height, self.request.steps)

    @property
    def images(self) -> int:
        return len(self.seeds)


def effective_priority(job: Job, now: float, aging_s: float) -> float:
    """Priority plus one point per `aging_s` seconds waited: any waiting job eventually outranks new ones."""
    return job.request.priority + max(now - job.enqueued_at, 0.0) / aging_s


def pick_batch(jobs: Sequence[Job], now: float, *, max_images: int, aging_s: float) -> list[Job]:
    """The most urgent job, then the next most urgent compatible jobs that still fit in `max_images`.

    A head job larger than `max_images` goes alone (the worker splits it into calls); ties go to the
    earlier arrival.
    """
    if not jobs:
        return []
    ranked = sorted(jobs, key=lambda job: (-effective_priority(job, now, aging_s), job.seq))
    head = ranked[0]
    batch = [head]
    images = head.images
    for job in ranked[1:]:
        if job.key == head.key and images + job.images <= max_images:
            batch.append(job)
            images += job.images
    return batch


def retry_after_s(images_ahead: int, throughput: DrainRate) -> int:
    """Whole seconds until the images ahead are likely done; at least 1."""
    seconds = throughput.seconds_for(images_ahead)
    if seconds is None:
        return 1
    return min(max(math.ceil(seconds), 1), MAX_RETRY_AFTER_S)
