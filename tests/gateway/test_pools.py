"""Upstream pools: passive health, streamed answers, and refunds when a backend dies or a client leaves."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import MappingProxyType

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config.quotas import Config, PoolPolicy, parse_config
from gateway.errors import BadGateway
from gateway.upstream.client import UpstreamClient
from gateway.upstream.forward import Forwarder
from tests.support.keys import key_store
from tests.support.quotas import QUOTAS
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream, serve_in_thread, upstream_process

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port
HANG = 10.0  # seconds; a bound on a hang, not a timing assertion


def _app(redis_url: str, urls: tuple[str, ...], registry: CollectorRegistry, pools: str = "") -> object:
    config = parse_config(QUOTAS + pools, source="quotas.yaml")
    settings = settings_for(redis_url, urls[0], upstreams=MappingProxyType({"diffusion": urls}))
    return create_app(settings, config, registry=registry)


def _refunded(registry: CollectorRegistry, plan: str = "free") -> float:
    labels = {"plan": plan, "reason": "upstream_error"}  # the path to the backend failed
    return registry.get_sample_value("quotagate_images_refunded_total", labels) or 0.0


def _until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + HANG
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
async def free_key(redis_client: Redis) -> str:
    return await key_store(redis_client).create_key("ann", "free")


def _post(client: TestClient | httpx.Client, key: str, n: int = 1) -> httpx.Response:
    return client.post(PATH, json={"prompt": "x", "n": n}, headers={"Authorization": f"Bearer {key}"})


def _failing_backend() -> Starlette:
    """A backend that says it has the most room and fails every image request: the fleet places on it first."""

    async def capacity(request: Request) -> Response:
        reading = {"slots": 100, "queue_images": 0, "queued_images": 0, "running_images": 0}
        return JSONResponse({**reading, "images_per_s": 1.0, "ready": True})

    async def images(request: Request) -> Response:
        return JSONResponse({"error": {"message": "GPU fault"}}, status_code=500)

    return Starlette(routes=[Route("/v1/capacity", capacity), Route(PATH, images, methods=["POST"])])


async def test_a_failing_upstream_is_set_aside_and_the_pool_keeps_serving(
    redis_url: str, upstream: StubUpstream, free_key: str
) -> None:
    registry = CollectorRegistry()
    with serve_in_thread(_failing_backend()) as failing:
        app = _app(
            redis_url, (failing, upstream.url), registry, "pools:\n  diffusion: {eject_after: 1, eject_for: 3600}\n"
        )
        with TestClient(app) as client:  # type: ignore[arg-type]
            # The failing one has the most room: the first request is placed there, and fails (relayed, refunded).
            assert _post(client, free_key).status_code == 500
            # Set aside now: every later request goes to the live one, wherever the fleet placed it.
            assert [_post(client, free_key).status_code for _ in range(3)] == [200, 200, 200]
    assert _refunded(registry) == 1
    assert len(upstream.seen) == 3
    assert registry.get_sample_value("quotagate_upstream_healthy_backends", {"pool": "diffusion"}) == 1


async def test_upstreams_come_back_after_eject_for_and_5xx_counts_but_503_does_not() -> None:
    now = [0.0]
    policy = PoolPolicy(eject_after=2, eject_for=10)
    with (
        serve_in_thread(StubUpstream(status=500).app()) as broken,
        serve_in_thread(StubUpstream(status=503).app()) as busy,
    ):
        client = UpstreamClient(connect_timeout=HANG, read_timeout=HANG)
        try:
            forwarder = Forwarder(client, {"p": (broken, busy)}, clock=lambda: now[0])

            async def once() -> str:
                answer = await forwarder.open("p", policy, "POST", PATH, [], b"{}")
                answer.finish()
                return answer.upstream.url

            assert await once() == broken  # 500: one failure
            assert await once() == broken  # 500: two in a row, set aside
            assert forwarder.healthy("p") == 1
            assert {await once() for _ in range(4)} == {busy}  # 503s are passed on, never held against it
            assert forwarder.healthy("p") == 1
            now[0] += 10
            assert forwarder.healthy("p") == 2 and await once() == broken  # back in the pool

            # Every upstream set aside: they are all tried again rather than none.
            forwarder = Forwarder(client, {"p": (DEAD,)}, clock=lambda: now[0])
            for _ in range(2):
                with pytest.raises(BadGateway):
                    await forwarder.open("p", policy, "POST", PATH, [], b"{}")
            assert forwarder.healthy("p") == 0
            with pytest.raises(BadGateway):
                await forwarder.open("p", policy, "POST", PATH, [], b"{}")
        finally:
            await client.close()


@contextmanager
def _gateway(redis_url: str, urls: tuple[str, ...], registry: CollectorRegistry) -> Iterator[str]:
    with serve_in_thread(_app(redis_url, urls, registry), lifespan="on") as url:  # type: ignore[arg-type]
        yield url


async def test_answers_are_streamed_to_the_client_as_they_arrive(
    redis_url: str, upstream: StubUpstream, free_key: str
) -> None:
    upstream.gate, upstream.split = threading.Event(), True
    registry = CollectorRegistry()
    with _gateway(redis_url, (upstream.url,), registry) as url:
        headers = {"Authorization": f"Bearer {free_key}"}
        async with (
            httpx.AsyncClient(base_url=url, timeout=HANG) as client,
            client.stream("POST", PATH, json={"prompt": "x"}, headers=headers) as answer,
        ):
            assert answer.status_code == 200
            assert answer.headers["x-ratelimit-remaining-images"] == "2"
            chunks = answer.aiter_raw()
            head = await anext(chunks)  # arrives while the upstream still holds the rest: it was not buffered
            assert head == b'{"created"'
            upstream.gate.set()
            rest = b"".join([chunk async for chunk in chunks])
        assert (head + rest).endswith(b'"data": [{"b64_json": "aW1hZ2U="}]}')
    assert _refunded(registry) == 0


async def test_a_client_gone_while_the_upstream_works_is_charged_once_it_answers(
    redis_url: str, upstream: StubUpstream, free_key: str
) -> None:
    upstream.gate = threading.Event()
    registry = CollectorRegistry()
    with _gateway(redis_url, (upstream.url,), registry) as url:
        port = int(url.rsplit(":", 1)[1])
        body = b'{"prompt": "x", "n": 3}'
        request = (
            f"POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {free_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(request)
            _until(lambda: len(upstream.seen) == 1, "the request never reached the upstream")
        # The client hung up while the upstream was working: the gateway withdraws the request, the
        # upstream cannot say it never began and answers, so its images stay charged.
        _until(lambda: len(upstream.withdrawn) == 1, "the request was never withdrawn")
        assert upstream.withdrawn[0] == upstream.seen[0]["x-quotagate-job"]
        upstream.gate.set()
        outcome = {"plan": "free", "route": PATH, "outcome": "client_gone"}
        _until(lambda: registry.get_sample_value("quotagate_requests_total", outcome) == 1, "never settled")
        assert _refunded(registry) == 0
        with httpx.Client(base_url=url, timeout=HANG) as again:
            assert _post(again, free_key, n=1).status_code == 429  # the day's three images are spent


@pytest.mark.slow
async def test_a_backend_killed_before_it_answers_is_a_502_and_refunded(redis_url: str, free_key: str) -> None:
    registry = CollectorRegistry()
    with upstream_process("hold") as (backend, backend_url), ThreadPoolExecutor(1) as pool:
        app = _app(redis_url, (backend_url,), registry)
        with TestClient(app) as client:  # type: ignore[arg-type]
            pending = pool.submit(_post, client, free_key, 2)
            assert backend.stdout is not None and backend.stdout.readline().strip() == "arrived"
            backend.kill()
            answer = pending.result(timeout=HANG)
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_error"
    assert answer.headers["x-ratelimit-remaining-images"] == "1"  # as charged; then refunded
    assert _refunded(registry) == 2


@pytest.mark.slow
async def test_a_backend_killed_mid_answer_cuts_it_short_and_is_refunded(
    redis_url: str, free_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quotagate.request")
    registry = CollectorRegistry()
    with upstream_process("split") as (backend, backend_url), _gateway(redis_url, (backend_url,), registry) as url:
        headers = {"Authorization": f"Bearer {free_key}"}
        async with (
            httpx.AsyncClient(base_url=url, timeout=HANG) as client,
            client.stream("POST", PATH, json={"prompt": "x", "n": 2}, headers=headers) as answer,
        ):
            assert answer.status_code == 200
            assert backend.stdout is not None and backend.stdout.readline().strip() == "sent"
            backend.kill()
            with pytest.raises(httpx.RemoteProtocolError):  # the body ends before it is whole
                await answer.aread()
        _until(lambda: _refunded(registry) == 2, "the charge was not refunded")
        outcome = {"plan": "free", "route": PATH, "outcome": "upstream_error"}
        assert registry.get_sample_value("quotagate_requests_total", outcome) == 1
    # The request's log line is written once the answer has ended, and says how it ended.
    (line,) = [r for r in caplog.records if r.name == "quotagate.request"]
    assert line.fields["outcome"] == "upstream_error" and line.fields["status"] == 200  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_a_whole_answer_cut_short_is_a_clean_502_and_refunded(redis_url: str, free_key: str) -> None:
    registry = CollectorRegistry()
    with (
        upstream_process("short") as (backend, backend_url),
        ThreadPoolExecutor(1) as pool,
        TestClient(_app(redis_url, (backend_url,), registry)) as client,  # type: ignore[arg-type]
    ):
        pending = pool.submit(_post, client, free_key, 2)
        assert backend.stdout is not None and backend.stdout.readline().strip() == "sent"
        backend.kill()
        answer = pending.result(timeout=HANG)
    # Its length was declared, so the gateway read it whole before answering: the client gets a 502, not half a body.
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_error"
    assert _refunded(registry) == 2
    outcome = {"plan": "free", "route": PATH, "outcome": "upstream_error"}
    assert registry.get_sample_value("quotagate_requests_total", outcome) == 1


async def test_an_upstream_past_its_read_timeout_is_a_502_and_refunded(
    redis_url: str, upstream: StubUpstream, config: Config, free_key: str
) -> None:
    upstream.gate = threading.Event()  # never opened while the gateway waits: only its timeout ends the wait
    registry = CollectorRegistry()
    settings = settings_for(redis_url, upstream.url, upstream_read_timeout=0.2)
    with TestClient(create_app(settings, config, registry=registry)) as client:
        answer = _post(client, free_key, 3)
    assert answer.status_code == 502 and "sent nothing for 0.2s" in answer.json()["error"]["message"]
    assert _refunded(registry) == 3
