from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from backend.batcher import Batcher, BatcherSettings
from backend.metrics import BackendMetrics
from backend.scheduling import Job, effective_priority, pick_batch
from tests.backend.conftest import FakeClock, RecordingRunner, request


def _batcher(recording: RecordingRunner, executor: ThreadPoolExecutor, clock: FakeClock) -> Batcher:
    settings = BatcherSettings(max_batch_images=1, max_wait_s=0, aging_s=1.0)
    return Batcher(recording, executor, BackendMetrics(CollectorRegistry()), settings, clock=clock)


async def _drain(batcher: Batcher, jobs: list[Job]) -> None:
    worker = asyncio.create_task(batcher.run())
    try:
        await asyncio.gather(*(job.future for job in jobs))
    finally:
        worker.cancel()


@pytest.mark.anyio
async def test_higher_priority_runs_first_from_a_full_queue(
    recording: RecordingRunner, executor: ThreadPoolExecutor
) -> None:
    batcher = _batcher(recording, executor, FakeClock())
    jobs = [batcher.submit(request(f"p{p}-{i}", priority=p)) for i, p in enumerate([0, 10, 5, 10, 0])]

    await _drain(batcher, jobs)

    assert recording.prompts == ["p10-1", "p10-3", "p5-2", "p0-0", "p0-4"]


@pytest.mark.anyio
@pytest.mark.parametrize(("waited", "first"), [(11.0, "free"), (5.0, "paid")])
async def test_a_waiting_request_ages_past_fresh_higher_priority_ones(
    recording: RecordingRunner, executor: ThreadPoolExecutor, waited: float, first: str
) -> None:
    clock = FakeClock()
    batcher = _batcher(recording, executor, clock)
    free = batcher.submit(request("free", priority=0))
    clock.advance(waited)
    paid = batcher.submit(request("paid", priority=10))

    await _drain(batcher, [free, paid])

    assert recording.prompts[0] == first


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """Jobs carry a future; the pure policy tests never run the loop."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


def _job(
    loop: asyncio.AbstractEventLoop, prompt: str, priority: int, at: float, seq: int, images: int = 1, size: int = 64
) -> Job:
    return Job(request(prompt, priority=priority, size=size), tuple(range(images)), at, seq, loop.create_future())


def test_a_free_request_is_served_within_a_bound_under_an_endless_paid_stream(
    loop: asyncio.AbstractEventLoop,
) -> None:
    aging_s, paid = 0.5, 10
    queue = [_job(loop, "free", 0, at=0.0, seq=0)]
    for tick in range(1, 100):
        now = float(tick)
        queue.append(_job(loop, f"paid{tick}", paid, at=now, seq=tick))
        [chosen] = pick_batch(queue, now, max_images=1, aging_s=aging_s)
        queue.remove(chosen)
        if chosen.request.prompt == "free":
            break
    # Waiting `paid * aging_s` seconds outranks every newcomer; older paid jobs are gone by then.
    assert tick <= paid * aging_s + 1


def test_compatible_lower_priority_jobs_fill_the_head_batch(loop: asyncio.AbstractEventLoop) -> None:
    queue = [
        _job(loop, "big", 9, at=0, seq=0, size=128),
        _job(loop, "head", 10, at=0, seq=1),
        _job(loop, "low", 0, at=0, seq=2),
        _job(loop, "too many", 5, at=0, seq=3, images=4),
    ]

    batch = pick_batch(queue, 0.0, max_images=4, aging_s=1.0)

    assert [job.request.prompt for job in batch] == ["head", "low"]


_queues = st.lists(
    st.tuples(st.integers(0, 20), st.floats(0, 100), st.integers(1, 4), st.sampled_from([64, 128])),
    min_size=1,
    max_size=12,
)


@hypothesis_settings(max_examples=200, deadline=None)
@given(queue=_queues, max_images=st.integers(1, 8), aging_s=st.floats(0.1, 10))
def test_pick_batch_properties(queue: list[tuple[int, float, int, int]], max_images: int, aging_s: float) -> None:
    loop = asyncio.new_event_loop()
    try:
        jobs = [
            _job(loop, f"j{i}", priority, at=at, seq=i, images=images, size=size)
            for i, (priority, at, images, size) in enumerate(queue)
        ]
        now = 100.0

        batch = pick_batch(jobs, now, max_images=max_images, aging_s=aging_s)

        head = batch[0]
        assert all(effective_priority(head, now, aging_s) >= effective_priority(job, now, aging_s) for job in jobs)
        assert all(job.key == head.key for job in batch)
        assert len(batch) == 1 or sum(job.images for job in batch) <= max_images
        assert len(set(map(id, batch))) == len(batch)
    finally:
        loop.close()
