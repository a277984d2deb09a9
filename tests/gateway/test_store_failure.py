"""When Redis fails: the circuit breaker, each plan's on_store_failure, and recovery by itself.

The end-to-end test runs two real gateway processes on a redis-server of its own, kills Redis
mid-test, and starts it again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.admission.storefailure import CircuitBreaker, LocalBudget, StoreGuard
from gateway.config.quotas import parse_config
from gateway.errors import ConfigError, ServiceUnavailable, Unauthorized
from gateway.observe.metrics import GatewayMetrics
from gateway.ops.embedded_redis import RedisServer
from limits import Bucket
from tests.conftest import MakeEngine
from tests.ports import free_port
from tests.support.keys import key_store
from tests.support.processes import Service, gateway_processes
from tests.support.quotas import QUOTAS
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
# free fails closed (the default; 100 a day here, so the test never meets its quota); pro fails open,
# 3 images at once per replica, 3 an hour after that.
PRO_OPEN = QUOTAS.replace("daily_images: 3", "daily_images: 100").replace(
    "    daily_images: unlimited\n",
    "    daily_images: unlimited\n    on_store_failure: open\n"
    "    store_failure_budget: {images: 3, per: hour, burst: 3}\n",
)
ANSWER_WITHIN = 5.0  # seconds: a request that takes longer has hung on the dead Redis
RECOVER_WITHIN = 15.0  # seconds for both gateways to serve again once Redis is back


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_failures_in_a_row_and_a_probe_closes_it() -> None:
    clock, changes = Clock(), []
    breaker = CircuitBreaker(failures=3, open_for=2.0, clock=clock, on_change=changes.append)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    breaker.succeeded()  # a success in between: the count starts again
    for _ in range(3):
        assert breaker.allow()
        breaker.failed()
    assert breaker.is_open and changes == [True]
    assert not breaker.allow() and breaker.retry_after() == 2.0

    clock.now += 2.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # and only one at a time
    breaker.failed()  # the probe failed: open for another spell
    assert not breaker.allow()
    clock.now += 2.0
    assert breaker.allow()
    breaker.succeeded()
    assert not breaker.is_open and breaker.allow() and changes == [True, False]


def test_a_probe_that_never_reports_is_replaced() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, open_for=2.0, clock=clock)
    breaker.failed()
    clock.now += 2.0
    assert breaker.allow()  # its request is cancelled: neither succeeded() nor failed() comes
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_the_local_budget_is_a_token_bucket_per_plan() -> None:
    clock = Clock()
    budget, bucket = LocalBudget(clock=clock), Bucket("pro-store-failure", "x", rate=3, period=3600, burst=3)
    assert [budget.take("pro", bucket, 1) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.take("pro", bucket, 1) == pytest.approx(1200.0)
    assert budget.take("team", bucket, 2) == 0.0  # another plan, another bucket
    assert budget.take("pro", bucket, 4) == math.inf
    clock.now += 1200.0
    assert budget.take("pro", bucket, 1) == 0.0


async def test_while_redis_is_away_a_replica_knows_the_identities_it_saw_until_told_otherwise(
    redis_client: Redis,
) -> None:
    breaker = CircuitBreaker(failures=1, clock=Clock())
    store = key_store(redis_client, breaker=breaker)
    key, other = await store.create_key("ann", "pro"), await store.create_key("bo", "pro")
    identity = await store.authenticate(key)
    store.clear()  # the invalidation subscription was lost: the cache goes...
    breaker.failed()  # ...and Redis cannot be asked

    assert await store.authenticate(key) == identity  # the last identity seen for this key
    with pytest.raises(Unauthorized):
        await store.authenticate(key[:-1] + ("1" if key.endswith("0") else "0"))  # its secret is still checked
    with pytest.raises(ServiceUnavailable):
        await store.authenticate(other)  # never seen here
    store.forget("ann")  # a revocation or plan change this replica heard of
    with pytest.raises(ServiceUnavailable):
        await store.authenticate(key)


async def test_with_the_breaker_open_nothing_waits_on_redis_and_refunds_are_given_up(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    clock, registry = Clock(), CollectorRegistry()
    config = parse_config(PRO_OPEN, source="q.yaml")
    metrics = GatewayMetrics(registry)
    breaker = CircuitBreaker(failures=1, open_for=2.0, clock=clock)
    guard = StoreGuard(make_engine(redis_client), metrics, breaker, LocalBudget(clock=clock))
    admitted = await guard.decide("ann", config.plans["free"], 1)
    assert admitted is not None and admitted.allowed
    breaker.failed()
    clock.now += 0.5

    with pytest.raises(ServiceUnavailable) as refused:
        await guard.decide("ann", config.plans["free"], 1)
    assert refused.value.headers["Retry-After"] == "2"  # when the breaker lets a probe through
    assert await guard.decide("ann", config.plans["pro"], 1) is None  # admitted without Redis
    assert await guard.refund("ann", config.plans["free"], admitted) is False
    assert registry.get_sample_value("quotagate_redis_errors_total", {"operation": "refund"}) == 1
    assert (await make_engine(redis_client).peek("ann", config.plans["free"].limits)).states[1].remaining == 99


def test_on_store_failure_in_the_quota_file() -> None:
    config = parse_config(PRO_OPEN, source="q.yaml")
    assert config.plans["free"].store_failure_budget is None
    budget = config.plans["pro"].store_failure_budget
    assert budget is not None and (budget.rate, budget.period, budget.burst) == (3, 3600, 3)


@pytest.mark.parametrize(
    "text,message",
    [
        (
            QUOTAS.replace("    daily_images: 3\n", "    daily_images: 3\n    on_store_failure: open\n"),
            "q.yaml:6: plans.free.store_failure_budget: required with on_store_failure: open, "
            "e.g. {images: 30, per: minute, burst: 5}",
        ),
        (
            QUOTAS.replace("    daily_images: 3\n", "    daily_images: 3\n    on_store_failure: maybe\n"),
            "q.yaml:6: plans.free.on_store_failure: expected open or closed, got 'maybe'",
        ),
        (
            QUOTAS.replace(
                "    daily_images: 3\n",
                "    daily_images: 3\n    store_failure_budget: {images: 1, per: hour, burst: 1}\n",
            ),
            "q.yaml:6: plans.free.store_failure_budget: only with on_store_failure: open",
        ),
    ],
)
def test_bad_on_store_failure_settings_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(text, source="q.yaml")
    assert str(refused.value) == message


# Two gateway processes, Redis killed and started again.


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server for this test alone, on a TCP port that stays the same across a restart."""
    server = RedisServer(tmp_path / "redis", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pro_open_file(tmp_path: Path) -> Path:
    """PRO_OPEN in a file, for gateway processes."""
    path = tmp_path / "quotas.yaml"
    path.write_text(PRO_OPEN)
    return path


@pytest.fixture
async def own_keys(own_redis: RedisServer) -> dict[str, str]:
    """A free and a pro key, made on the test's own Redis."""
    redis = Redis.from_url(own_redis.url)
    try:
        store = key_store(redis)
        return {plan: await store.create_key(f"acct-{plan}", plan) for plan in ("free", "pro")}
    finally:
        await redis.aclose()


async def _generate(client: httpx.AsyncClient, gateway: Service, key: str) -> httpx.Response:
    body = {"prompt": "a lighthouse", "n": 1}
    return await client.post(f"{gateway.url}{PATH}", json=body, headers={"Authorization": f"Bearer {key}"})


@pytest.mark.slow
async def test_redis_killed_and_restarted_under_both_failure_modes(
    own_redis: RedisServer, own_keys: dict[str, str], pro_open_file: Path, upstream: StubUpstream, tmp_path: Path
) -> None:
    keys = own_keys
    with gateway_processes(2, pro_open_file, own_redis.url, upstream.url, tmp_path) as gateways:
        async with httpx.AsyncClient(timeout=ANSWER_WITHIN) as client:
            for gateway in gateways:  # each replica has seen both keys while Redis was up
                for key in keys.values():
                    assert (await _generate(client, gateway, key)).status_code == 200

            own_redis.kill()

            for gateway in gateways:
                # Closed: refused at once with 503 and Retry-After, for as long as Redis is down.
                for _ in range(6):  # enough failures in a row to open the breaker
                    closed = await _generate(client, gateway, keys["free"])
                    assert closed.status_code == 503, closed.text
                    assert closed.json()["error"]["code"] == "service_unavailable"
                    assert int(closed.headers["Retry-After"]) >= 1
                # Open: admitted, up to this replica's budget of 3, then 503 too.
                opened = [await _generate(client, gateway, keys["pro"]) for _ in range(5)]
                assert [a.status_code for a in opened] == [200, 200, 200, 503, 503], gateway.logged()
                assert int(opened[-1].headers["Retry-After"]) >= 1

                assert gateway.metric("quotagate_store_failure_requests_total", plan="pro", action="allowed") == 3
                assert gateway.metric("quotagate_store_failure_requests_total", plan="pro", action="denied") == 2
                assert gateway.metric("quotagate_store_failure_requests_total", plan="free", action="denied") == 6
                assert gateway.metric("quotagate_store_circuit_open") == 1
                ready = await client.get(f"{gateway.url}/readyz")
                assert ready.status_code == 503 and ready.json()["status"] == "unavailable"

            own_redis.start()

            # Recovery by itself: the breaker lets a probe through, it succeeds, requests flow again.
            deadline = time.monotonic() + RECOVER_WITHIN
            for gateway in gateways:
                while (await _generate(client, gateway, keys["free"])).status_code != 200:
                    assert time.monotonic() < deadline, gateway.logged()
                    await asyncio.sleep(0.1)
                assert (await client.get(f"{gateway.url}/readyz")).status_code == 200
                assert gateway.metric("quotagate_store_circuit_open") == 0
                assert (await _generate(client, gateway, keys["pro"])).status_code == 200


@pytest.mark.slow
async def test_a_hung_redis_costs_requests_a_timeout_at_most_then_the_breaker_answers(
    own_redis: RedisServer, own_keys: dict[str, str], pro_open_file: Path, upstream: StubUpstream, tmp_path: Path
) -> None:
    keys = own_keys
    with gateway_processes(1, pro_open_file, own_redis.url, upstream.url, tmp_path) as (gateway,):
        async with httpx.AsyncClient(timeout=ANSWER_WITHIN) as client:
            for key in keys.values():
                assert (await _generate(client, gateway, key)).status_code == 200
            own_redis.pause()  # connections stay up; nothing answers
            try:
                # Each answered (a hang would time the client out), closed refused, open admitted.
                closed = [(await _generate(client, gateway, keys["free"])).status_code for _ in range(6)]
                opened = [(await _generate(client, gateway, keys["pro"])).status_code for _ in range(3)]
                assert closed == [503] * 6 and opened == [200] * 3, gateway.logged()
                assert gateway.metric("quotagate_store_circuit_open") == 1
                assert (await client.get(f"{gateway.url}/readyz")).status_code == 503
                headers = {"Authorization": f"Bearer {keys['free']}"}
                quota = await client.get(f"{gateway.url}/v1/quota", headers=headers)
                assert quota.status_code == 503 and int(quota.headers["Retry-After"]) >= 1
            finally:
                own_redis.resume()
            deadline = time.monotonic() + RECOVER_WITHIN
            while (await _generate(client, gateway, keys["free"])).status_code != 200:
                assert time.monotonic() < deadline, gateway.logged()
                await asyncio.sleep(0.1)
