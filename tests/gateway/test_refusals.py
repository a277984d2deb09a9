"""Exhausted accounts are refused first: right after authentication, from an answer rendered once per cached refusal."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.admission.refusals import Refusals
from gateway.app import create_app
from gateway.config.quotas import Config
from limits.nearcache import REFRESH_S, DenialCache
from tests.conftest import MakeEngine
from tests.support.keys import key_store
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
NOON = datetime(2026, 11, 21, 12, 0, tzinfo=UTC).timestamp()


async def test_an_exhausted_account_is_refused_before_its_body_is_read(
    redis_url: str, redis_client: Redis, upstream: StubUpstream, config: Config
) -> None:
    key = await key_store(redis_client).create_key("acct-spent", "free")
    registry = CollectorRegistry()
    app = create_app(settings_for(redis_url, upstream.url, max_body_bytes=64), config, registry=registry)
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:
        assert client.post(PATH, json={"prompt": "x", "n": 3}, headers=auth).status_code == 200
        assert client.post(PATH, json={"prompt": "x"}, headers=auth).status_code == 429  # Redis refuses: now cached
        # Neither body is read, let alone parsed: a 400 or a 413 would only send the client back sooner.
        not_json = client.post(PATH, content=b"{not json", headers={**auth, "X-Request-Id": "spent-1"})
        too_big = client.post(PATH, content=b"x" * 1000, headers=auth)
    for refused in (not_json, too_big):
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        assert refused.headers["x-ratelimit-remaining-images"] == "0"
        assert int(refused.headers["Retry-After"]) >= 1
    assert not_json.headers["X-Request-Id"] == "spent-1" and too_big.headers["X-Request-Id"] != "spent-1"
    assert len(upstream.seen) == 1
    labels = {"plan": "free", "route": PATH, "outcome": "quota_exhausted"}
    assert registry.get_sample_value("quotagate_requests_total", labels) == 3


async def test_a_refusal_is_rendered_once_per_cached_refusal(
    redis_client: Redis, config: Config, make_engine: MakeEngine
) -> None:
    now = [NOON]
    near_cache = DenialCache(clock=lambda: now[0])
    engine, refusals, plan = (
        make_engine(redis_client, near_cache=near_cache),
        Refusals(near_cache),
        config.plans["free"],
    )
    assert refusals.answer("ann", plan) is None  # nothing known: the request goes on to Redis
    await engine.decide("ann", plan.limits, 3, now=NOON)
    assert not (await engine.decide("ann", plan.limits, 1, now=NOON)).allowed

    first = refusals.answer("ann", plan)
    assert first is not None and first.status == 429
    assert refusals.answer("ann", plan) is first  # the near-cache serves the same refusal: the same bytes
    now[0] += REFRESH_S / 2
    assert refusals.answer("ann", plan) is first
    now[0] += 1.0  # past REFRESH_S, and a whole second off the reset
    rebuilt = refusals.answer("ann", plan)
    assert rebuilt is not None and rebuilt is not first  # rebuilt with its waits shortened
    reset = {name: value for name, value in first.headers}[b"x-ratelimit-reset-images"]
    assert {name: value for name, value in rebuilt.headers}[b"x-ratelimit-reset-images"] < reset
    assert refusals.answer("bob", plan) is None
    near_cache.forget("ann")  # a grant or a reset
    assert refusals.answer("ann", plan) is None
