"""Load shedding: free waits before pro when the pool is full, a waiting request costs nothing, and without
Redis each process bounds the pool alone with a jittered Retry-After."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.admission.shedding import RETRY_AFTER_S, Shedder, Slot
from gateway.app import create_app
from gateway.config.quotas import PoolPolicy, parse_config
from gateway.errors import Overloaded
from tests.support.keys import key_store
from tests.support.quotas import QUOTAS
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream, serve_in_thread

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
HANG = 10.0  # seconds; a bound on a hang, not a timing assertion


def _enter(shedder: Shedder, policy: PoolPolicy, *, lowest_priority: bool) -> Slot:
    return shedder.enter("p", policy, lowest_priority=lowest_priority)


def test_the_lowest_priority_may_fill_only_the_unreserved_share() -> None:
    shedder, policy = Shedder(random.Random(1)), PoolPolicy(max_in_flight=4, reserved_for_paid=0.5)
    free = [_enter(shedder, policy, lowest_priority=True) for _ in range(2)]
    with pytest.raises(Overloaded) as shed:
        _enter(shedder, policy, lowest_priority=True)
    assert shed.value.status == 503 and shed.value.code == "overloaded"
    assert RETRY_AFTER_S[0] <= int(shed.value.headers["Retry-After"]) <= RETRY_AFTER_S[1]
    paid = [_enter(shedder, policy, lowest_priority=False) for _ in range(2)]
    with pytest.raises(Overloaded):
        _enter(shedder, policy, lowest_priority=False)  # full for everyone
    assert shedder.in_flight("p") == 4
    free[0].release()
    free[0].release()  # twice is once
    assert shedder.in_flight("p") == 3
    with pytest.raises(Overloaded):
        _enter(shedder, policy, lowest_priority=True)  # 3 held: still over free's share of 2
    paid[0].release()
    free[1].release()
    _enter(shedder, policy, lowest_priority=True)  # 1 held: under free's share again
    assert shedder.in_flight("other") == 0


def test_retry_after_is_jittered() -> None:
    shedder, policy = Shedder(random.Random(3)), PoolPolicy(max_in_flight=1, reserved_for_paid=1.0)  # free: none
    waits = set()
    for _ in range(50):
        with pytest.raises(Overloaded) as shed:
            shedder.enter("p", policy, lowest_priority=True)
        waits.add(int(shed.value.headers["Retry-After"]))
    assert waits == set(range(RETRY_AFTER_S[0], RETRY_AFTER_S[1] + 1))


def _until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + HANG
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


async def test_under_overload_free_waits_while_pro_gets_through_and_waiting_costs_nothing(
    redis_url: str, redis_client: Redis, upstream: StubUpstream
) -> None:
    store = key_store(redis_client)
    keys = {name: await store.create_key(name, name.split("-")[0]) for name in ("free-a", "free-b", "free-c", "pro-a")}
    config = parse_config(QUOTAS + "pools:\n  diffusion: {max_in_flight: 4, reserved_for_paid: 0.5}\n", source="q")
    settings = settings_for(redis_url, upstream.url, upstreams=MappingProxyType({"diffusion": (upstream.url,)}))
    registry = CollectorRegistry()
    upstream.gate = threading.Event()  # the upstream holds every answer: the pool fills up

    def post(name: str, n: int = 1) -> httpx.Response:
        body = {"prompt": "x", "n": n}
        return httpx.post(f"{url}{PATH}", json=body, headers={"Authorization": f"Bearer {keys[name]}"}, timeout=HANG)

    def shed(plan: str) -> float:
        labels = {"plan": plan, "route": PATH, "outcome": "shed"}
        return registry.get_sample_value("quotagate_requests_total", labels) or 0.0

    with (
        serve_in_thread(create_app(settings, config, registry=registry), lifespan="on") as url,
        ThreadPoolExecutor(4) as pool,
    ):
        held = [pool.submit(post, "free-a"), pool.submit(post, "free-b")]
        _until(lambda: len(upstream.seen) == 2, "the free requests never reached the upstream")

        waiting = post("free-c", 3)  # free's share (2 of 4 images) is taken: it is told its turn
        assert waiting.status_code == 503
        assert waiting.json()["error"]["code"] == "overloaded"
        assert waiting.headers["Quotagate-Line"].startswith("position=1,")
        assert int(waiting.headers["Retry-After"]) >= 1

        held += [pool.submit(post, "pro-a"), pool.submit(post, "pro-a")]  # paid plans use the reserved share
        _until(lambda: len(upstream.seen) == 4, "pro never got through")
        assert post("pro-a").status_code == 503  # now full for everyone
        assert (shed("free"), shed("pro")) == (1, 1)

        upstream.gate.set()
        assert [h.result(timeout=HANG).status_code for h in held] == [200, 200, 200, 200]
        assert post("pro-a").status_code == 200  # back for its turn, ahead of free's
        # Waiting cost nothing: all three of free-c's images are still there, and its turn is kept.
        assert post("free-c", 3).status_code == 200
    assert registry.get_sample_value("quotagate_images_charged_total", {"plan": "free"}) == 5


async def test_a_request_refused_after_entering_the_pool_gives_its_place_back(
    redis_url: str, redis_client: Redis, upstream: StubUpstream
) -> None:
    key = await key_store(redis_client).create_key("free-d", "free")
    config = parse_config(QUOTAS + "pools:\n  diffusion: {max_in_flight: 4, reserved_for_paid: 0.5}\n", source="q")
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings_for(redis_url, upstream.url), config)) as client:
        places = client.app.state.services.places  # type: ignore[attr-defined]
        assert client.post(PATH, content=b"not json", headers=auth).status_code == 400
        assert client.post(PATH, json={"prompt": "x", "n": 100}, headers=auth).status_code == 400
        assert client.post(PATH, json={"prompt": "x", "n": 3}, headers=auth).status_code == 200
        assert places.in_flight("diffusion") == 0
        # Its quota spent, the decision refuses it after it took a place: the place goes back.
        assert client.post(PATH, json={"prompt": "x"}, headers=auth).status_code == 429
        assert places.in_flight("diffusion") == 0
