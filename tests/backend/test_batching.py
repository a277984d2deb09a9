from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from backend.batcher import Batcher, BatcherSettings
from backend.metrics import BackendMetrics
from backend.validation import GenerationRequest
from tests.backend.conftest import FakeClock, RecordingRunner, request

pytestmark = pytest.mark.anyio


async def run_queued(
    recording: RecordingRunner,
    executor: ThreadPoolExecutor,
    requests: list[GenerationRequest],
    *,
    max_batch_images: int = 4,
) -> list[list[bytes]]:
    """Queue every request first, then start the worker: what runs together is decided by the batcher alone."""
    metrics = BackendMetrics(CollectorRegistry())
    batcher = Batcher(recording, executor, metrics, BatcherSettings(max_batch_images=max_batch_images, max_wait_s=0))
    jobs = [batcher.submit(item) for item in requests]
    worker = asyncio.create_task(batcher.run())
    try:
        return list(await asyncio.gather(*(job.future for job in jobs)))
    finally:
        worker.cancel()


async def test_a_seeded_request_gets_the_same_pngs_alone_or_in_a_batch(
    recording: RecordingRunner, executor: ThreadPoolExecutor
) -> None:
    [alone] = await run_queued(recording, executor, [request("a fox", n=2, seed=7)])
    assert len(recording.calls) == 1

    recording.calls.clear()
    batched = await run_queued(
        recording,
        executor,
        [request("a cat", seed=1), request("a fox", n=2, seed=7), request("a fox", seed=8)],
    )

    assert recording.calls == [["a cat", "a fox", "a fox", "a fox"]]
    assert batched[1] == alone
    # Image i of a request with seed s uses seed s + i.
    assert batched[2] == [alone[1]]
    assert alone[0] != alone[1]


async def test_only_compatible_requests_run_together(recording: RecordingRunner, executor: ThreadPoolExecutor) -> None:
    results = await run_queued(
        recording,
        executor,
        [request("small a", n=2), request("large", size=128), request("small b")],
    )

    assert recording.calls == [["small a", "small a", "small b"], ["large"]]
    assert [size for size, _ in recording.shapes] == [(64, 64), (128, 128)]
    assert [len(pngs) for pngs in results] == [2, 1, 1]


async def test_only_batches_holding_a_seeded_request_are_padded(
    recording: RecordingRunner, executor: ThreadPoolExecutor
) -> None:
    await run_queued(recording, executor, [request("free"), request("seeded", size=128, seed=3)])

    assert recording.shapes == [((64, 64), 0), ((128, 128), 4)]


async def test_batching_off_runs_one_image_per_call(recording: RecordingRunner, executor: ThreadPoolExecutor) -> None:
    results = await run_queued(recording, executor, [request("a", n=3), request("b")], max_batch_images=1)

    assert recording.calls == [["a"], ["a"], ["a"], ["b"]]
    assert [len(pngs) for pngs in results] == [3, 1]
    assert len(set(results[0])) == 3


async def test_a_partial_batch_is_held_for_a_request_that_arrives_within_max_wait(
    recording: RecordingRunner, executor: ThreadPoolExecutor
) -> None:
    clock = FakeClock()
    settings = BatcherSettings(max_batch_images=2, max_wait_s=60.0)
    batcher = Batcher(recording, executor, BackendMetrics(CollectorRegistry()), settings, clock=clock)
    first = batcher.submit(request("first"))
    worker = asyncio.create_task(batcher.run())
    try:
        # Let the worker see "first" alone and start holding it; the clock stands still, so it holds on.
        for _ in range(10):
            await asyncio.sleep(0)
        second = batcher.submit(request("second"))
        await asyncio.gather(first.future, second.future)
    finally:
        worker.cancel()

    assert recording.calls == [["first", "second"]]
