"""Withdrawing a request by its job token: a queued one never starts, a started one runs on, an early one is kept.

The real tiny model behind the app; the worker is held busy by a gated job so that requests stay queued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from backend.withdrawals import JOB_HEADER, Withdrawals
from tests.backend.conftest import (
    AppFactory,
    FakeClock,
    RecordingRunner,
    backend_state,
    batcher_of,
    make_settings,
    portal,
    request,
)

IMAGES = "/v1/images/generations"
REMEMBER_S = 60.0


@pytest.fixture
def posting(recording: RecordingRunner) -> Iterator[ThreadPoolExecutor]:
    """Threads for requests that wait on the held worker while the test goes on."""
    with ThreadPoolExecutor(4) as pool:
        yield pool
        recording.gate.set()  # a failed test must not leave the worker and its requests held


def _generate(client: TestClient, token: str, prompt: str, n: int = 1) -> Any:
    return client.post(IMAGES, json={"prompt": prompt, "n": n}, headers={JOB_HEADER: token})


async def _settled(future: asyncio.Future[list[bytes]]) -> None:
    await future


def _until(condition: Callable[[], object], what: str) -> None:
    """Wait for `condition()` to hold; the bound only stops a hung test."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.001)


def _counter(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


def test_a_queued_request_withdrawn_answers_409_and_makes_no_image(
    serve: AppFactory, recording: RecordingRunner, posting: ThreadPoolExecutor
) -> None:
    registry = CollectorRegistry()
    client = serve(make_settings(max_batch_images=1), registry=registry)
    batcher = batcher_of(client)
    recording.gate.clear()  # the worker takes the blocker and stays busy with it
    blocker = portal(client).call(batcher.submit, request("blocker"))
    assert recording.entered.wait(timeout=60)
    images_before = _counter(registry, "quotagate_backend_images_generated_total")

    queued: Future[Any] = posting.submit(_generate, client, "job-queued", "never made", 2)
    _until(lambda: batcher.queued, "the request is queued")
    withdrawal = client.delete("/v1/jobs/job-queued")

    assert withdrawal.status_code == 200
    assert withdrawal.json() == {"withdrawn": True}
    answer = queued.result(timeout=60)
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "withdrawn"
    assert answer.headers["X-Quotagate-Withdrawn"] == "1"
    assert batcher.queued == []
    assert _counter(registry, "quotagate_backend_withdrawn_total") == 1
    recording.gate.set()
    portal(client).call(_settled, blocker.future)
    assert "never made" not in recording.prompts
    # The blocker's one image is all the worker made.
    assert _counter(registry, "quotagate_backend_images_generated_total") == images_before + 1


def test_a_request_already_running_is_not_withdrawn_and_answers_its_images(
    serve: AppFactory, recording: RecordingRunner, posting: ThreadPoolExecutor
) -> None:
    registry = CollectorRegistry()
    client = serve(make_settings(max_batch_images=4), registry=registry)
    recording.gate.clear()
    running: Future[Any] = posting.submit(_generate, client, "job-running", "running", 2)
    assert recording.entered.wait(timeout=60)  # its batch has begun

    withdrawal = client.delete("/v1/jobs/job-running")

    assert withdrawal.status_code == 409
    assert withdrawal.json() == {"withdrawn": False, "started": True}
    recording.gate.set()
    answer = running.result(timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 2
    assert "X-Quotagate-Withdrawn" not in answer.headers
    assert _counter(registry, "quotagate_backend_withdrawn_total") == 0
    assert recording.prompts == ["running", "running"]


def test_a_withdrawal_before_its_request_is_kept_for_a_minute(serve: AppFactory, recording: RecordingRunner) -> None:
    registry = CollectorRegistry()
    client = serve(make_settings(), registry=registry)
    clock = FakeClock()
    backend_state(client).withdrawals = Withdrawals(remember_s=REMEMBER_S, clock=clock)

    assert client.delete("/v1/jobs/job-early").json() == {"withdrawn": True}
    assert client.delete("/v1/jobs/job-forgotten").json() == {"withdrawn": True}
    clock.advance(REMEMBER_S - 1)
    early = _generate(client, "job-early", "overtaken")
    clock.advance(1)
    late = _generate(client, "job-forgotten", "arrived too late")

    assert early.status_code == 409, early.text
    assert early.json()["error"]["code"] == "withdrawn"
    assert early.headers["X-Quotagate-Withdrawn"] == "1"
    assert "overtaken" not in recording.prompts
    assert _counter(registry, "quotagate_backend_withdrawn_total") == 1
    # Past the memory, the request simply runs.
    assert late.status_code == 200, late.text
    assert recording.prompts == ["arrived too late"]
    # A token is honoured once: the same token again runs.
    again = _generate(client, "job-early", "again")
    assert again.status_code == 200, again.text
