from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from backend.scheduling import Job
from backend.validation import GenerationRequest
from tests.backend.conftest import (
    AppFactory,
    RecordingRunner,
    batcher_of,
    hold_worker,
    make_limits,
    make_settings,
    portal,
    request,
)


def _queue(client: TestClient, *requests: GenerationRequest) -> list[Job]:
    return [portal(client).call(batcher_of(client).submit, item) for item in requests]


def _finish(client: TestClient, recording: RecordingRunner, jobs: list[Job]) -> None:
    recording.gate.set()

    async def wait() -> None:
        await asyncio.gather(*(job.future for job in jobs))

    portal(client).call(wait)


def test_a_full_queue_answers_503_at_once_with_retry_after(serve: AppFactory, recording: RecordingRunner) -> None:
    registry = CollectorRegistry()
    settings = make_settings(limits=make_limits(max_n=2), max_queue_images=2, max_batch_images=1)
    client = serve(settings, registry=registry)
    blocker = hold_worker(client, recording)
    queued = _queue(client, request("q1"), request("q2"))
    batcher_of(client).throughput.observe(images=2, seconds=1.0)

    response = client.post("/v1/images/generations", json={"prompt": "one too many"})

    assert response.status_code == 503
    # Three images ahead (one running, two queued) at 2 images/s: 1.5 s, rounded up.
    assert response.headers["Retry-After"] == "2"
    assert response.json()["error"]["type"] == "server_overloaded"
    assert response.json()["error"]["code"] == "queue_full"
    assert registry.get_sample_value("quotagate_backend_rejections_total", {"reason": "queue_full"}) == 1
    _finish(client, recording, [blocker, *queued])
    assert "one too many" not in recording.prompts


def test_a_wait_longer_than_allowed_answers_503(serve: AppFactory, recording: RecordingRunner) -> None:
    client = serve(make_settings(max_queue_images=64, max_queue_wait_s=2.0, max_batch_images=1))
    blocker = hold_worker(client, recording)
    queued = _queue(client, request("q1"))
    batcher_of(client).throughput.observe(images=1, seconds=1.0)

    response = client.post("/v1/images/generations", json={"prompt": "would wait 3s"})

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_wait"
    assert response.headers["Retry-After"] == "2"
    _finish(client, recording, [blocker, *queued])


def test_a_client_that_leaves_while_queued_never_reaches_the_model(
    serve: AppFactory, recording: RecordingRunner
) -> None:
    registry = CollectorRegistry()
    client = serve(make_settings(max_batch_images=1), registry=registry)
    blocker = hold_worker(client, recording)
    batcher = batcher_of(client)

    async def leave_while_queued() -> tuple[int, list[dict[str, Any]]]:
        gone = asyncio.Event()
        body = json.dumps({"prompt": "left early"}).encode()
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/images/generations",
            "raw_path": b"/v1/images/generations",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        call: asyncio.Task[None] = asyncio.create_task(client.app(scope, receive, send))  # type: ignore[arg-type]
        for _ in range(10_000):
            if batcher.queued:
                break
            await asyncio.sleep(0)
        queued_before = len(batcher.queued)
        gone.set()
        await call
        return queued_before, sent

    queued_before, sent = portal(client).call(leave_while_queued)

    assert queued_before == 1
    assert batcher.queued == []
    assert sent[0]["status"] == 499
    assert registry.get_sample_value("quotagate_backend_cancelled_total") == 1
    _finish(client, recording, [blocker])
    after = client.post("/v1/images/generations", json={"prompt": "after"})
    assert after.status_code == 200
    assert recording.prompts == ["blocker", "after"]
