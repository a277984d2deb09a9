"""Idempotency-Key through the gateway: a key buys one answer, replayed as it was, never new images for free."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config.quotas import Config
from limits.keys import idempotency_answer, idempotency_record
from tests.support.keys import key_store
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
HANG = 10.0  # seconds; a bound on a hang, not a timing assertion


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(redis_url: str, upstream: StubUpstream, config: Config, registry: CollectorRegistry) -> Iterator[TestClient]:
    app = create_app(settings_for(redis_url, upstream.url), config, registry=registry)
    with TestClient(app) as client:
        yield client


@pytest.fixture
async def key(redis_client: Redis) -> str:
    return await key_store(redis_client).create_key("ann", "free")


def post(client: TestClient | httpx.Client, key: str, idempotency_key: str | None, n: int = 1) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return client.post(PATH, json={"prompt": "a lighthouse", "n": n}, headers=headers)


def used_today(client: TestClient | httpx.Client, key: str) -> int:
    limits = client.get("/v1/quota", headers={"Authorization": f"Bearer {key}"}).json()["limits"]
    return next(limit["used"] for limit in limits if limit["kind"] == "daily")


def charged(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("quotagate_images_charged_total", {"plan": "free"}) or 0.0


async def test_a_replay_gets_the_first_answer_again_without_reaching_the_backend_or_a_charge(
    client: TestClient, key: str, upstream: StubUpstream, registry: CollectorRegistry
) -> None:
    first = post(client, key, "order-1", n=2)
    replays = [post(client, key, "order-1", n=2) for _ in range(3)]
    assert first.status_code == 200 and len(first.json()["data"]) == 2
    for replay in replays:
        assert (replay.status_code, replay.content) == (200, first.content)
        assert replay.headers["content-type"] == first.headers["content-type"]
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.headers["x-request-id"] != first.headers["x-request-id"]
    assert "idempotent-replayed" not in first.headers
    assert len(upstream.seen) == 1
    assert used_today(client, key) == 2 and charged(registry) == 2
    labels = {"plan": "free", "route": PATH, "outcome": "replayed"}
    assert registry.get_sample_value("quotagate_requests_total", labels) == 3


async def test_a_key_sent_again_with_another_body_is_a_422_and_gets_no_images(
    client: TestClient, key: str, upstream: StubUpstream
) -> None:
    assert post(client, key, "K", n=1).status_code == 200
    for _ in range(8):  # the same key, asking for more
        refused = post(client, key, "K", n=4)
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "idempotency_key_reused"
        assert "data" not in refused.json()
    assert len(upstream.seen) == 1
    assert used_today(client, key) == 1


async def test_concurrent_first_requests_with_one_key_reach_the_backend_once_and_the_others_get_409(
    redis_url: str, key: str, config: Config, upstream: StubUpstream
) -> None:
    upstream.gate = threading.Event()  # the first request stays in flight until the gate opens
    app = create_app(settings_for(redis_url, upstream.url), config, registry=CollectorRegistry())
    # Requests from several threads run concurrently on the test client's event loop.
    with TestClient(app) as http, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, http, key, "same-key") for _ in range(8)]
        # One is held at the upstream; the others are answered while it is.
        _until(lambda: sum(f.done() for f in futures) == 7 and len(upstream.seen) == 1)
        conflicts = [f.result() for f in futures if f.done()]
        upstream.gate.set()
        assert [f.result(timeout=HANG).status_code for f in futures].count(200) == 1
        assert [c.status_code for c in conflicts] == [409] * 7
        assert {c.json()["error"]["code"] for c in conflicts} == {"idempotency_key_in_flight"}
        assert all(c.headers["retry-after"] == "1" for c in conflicts)
        assert len(upstream.seen) == 1
        assert used_today(http, key) == 1


def _until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG
    while not check():
        assert time.monotonic() < deadline, "the requests were neither answered nor held"
        time.sleep(0.005)


async def test_a_replay_past_the_answers_lifetime_is_a_422_that_says_it_expired(
    client: TestClient, key: str, redis_client: Redis, upstream: StubUpstream
) -> None:
    assert post(client, key, "old").status_code == 200
    assert 0 < await redis_client.pttl(idempotency_answer("ann", "old")) <= 24 * 3600 * 1000
    assert await redis_client.pttl(idempotency_record("ann", "old")) > 24 * 3600 * 1000
    await redis_client.delete(idempotency_answer("ann", "old"))  # what the end of its lifetime does
    expired = post(client, key, "old")
    assert expired.status_code == 422
    assert expired.json()["error"]["code"] == "idempotency_answer_expired"
    assert len(upstream.seen) == 1 and used_today(client, key) == 1


async def test_an_answer_over_the_cap_is_not_kept_and_its_replay_is_a_422(
    redis_url: str, key: str, config: Config, upstream: StubUpstream
) -> None:
    app = create_app(settings_for(redis_url, upstream.url, idempotency_answer_bytes=10), config)
    with TestClient(app) as client:
        assert post(client, key, "big").status_code == 200
        replay = post(client, key, "big")
        assert replay.status_code == 422
        assert replay.json()["error"]["code"] == "idempotency_answer_not_kept"
        assert len(upstream.seen) == 1 and used_today(client, key) == 1


async def test_a_request_whose_upstream_failed_is_refunded_and_frees_its_key(
    client: TestClient, key: str, upstream: StubUpstream
) -> None:
    upstream.status = 500
    assert post(client, key, "retry-me").status_code == 500  # passed on, and refunded
    upstream.status = 200
    retried = post(client, key, "retry-me")
    replayed = post(client, key, "retry-me")
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert replayed.headers["idempotent-replayed"] == "true" and replayed.content == retried.content
    assert len(upstream.seen) == 2 and used_today(client, key) == 1


async def test_an_account_whose_quota_is_spent_still_gets_its_kept_answer(
    client: TestClient, key: str, upstream: StubUpstream
) -> None:
    first = post(client, key, "last-images", n=3)
    assert post(client, key, None).status_code == 429  # spent: the near-cache now refuses it first
    replay = post(client, key, "last-images", n=3)
    assert (replay.status_code, replay.content) == (200, first.content)
    assert len(upstream.seen) == 1


async def test_the_quoted_and_the_bare_form_are_one_key(client: TestClient, key: str, upstream: StubUpstream) -> None:
    assert post(client, key, '"8e03978e-40d5"').status_code == 200
    assert post(client, key, "8e03978e-40d5").headers["idempotent-replayed"] == "true"
    assert post(client, key, '"8e03978e-40d5\\"x"').status_code == 200  # an escaped quote is part of a key
    assert len(upstream.seen) == 2


@pytest.mark.parametrize(
    "value",
    ["", "x" * 256, "two words", '"two words"', '"unterminated', '"a"b"', '"a\\b"', '"a", "b"', "tab\there"],
)
async def test_a_malformed_key_is_a_400_that_says_what_a_key_is(
    client: TestClient, key: str, upstream: StubUpstream, value: str
) -> None:
    refused = post(client, key, value)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "Idempotency-Key"
    assert "1 to 255 visible ASCII characters" in refused.json()["error"]["message"]
    assert not upstream.seen and used_today(client, key) == 0


async def test_a_key_of_255_visible_characters_is_taken(client: TestClient, key: str) -> None:
    assert post(client, key, "~" * 255).status_code == 200
