"""Rate-limit fields: IETF draft fields, OpenAI's x-ratelimit-*, and a Retry-After spread past midnight."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.admission.ratelimit_headers import DAILY_RESET_SPREAD_S, duration, retry_after
from gateway.app import create_app
from gateway.config.quotas import Config
from limits import Bucket, DailyQuota, LimitSet
from tests.conftest import MakeEngine
from tests.support.keys import key_store
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
NOON = 1_800_000_000.0 - 1_800_000_000.0 % 86400 + 12 * 3600  # a UTC noon


@pytest.mark.parametrize(
    "seconds,text",
    [(0, "0s"), (0.0201, "21ms"), (1, "1s"), (1.5, "1.5s"), (8.6401, "8.641s"), (360, "6m0s"), (47_000.2, "13h3m21s")],
)
def test_durations_read_like_openais_and_never_understate(seconds: float, text: str) -> None:
    assert duration(seconds) == text


async def test_retry_after_a_daily_refusal_is_spread_past_the_reset_never_before(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    limits = LimitSet(
        buckets=(Bucket(name="b", counter="b", rate=60, period=60, burst=10),),
        quotas=(DailyQuota(name="d", counter="d", limit=1, timezone=ZoneInfo("UTC")),),
    )
    engine = make_engine(redis_client)
    await engine.decide("ann", limits, 1, now=NOON)
    refused = await engine.decide("ann", limits, 1, now=NOON)
    assert not refused.allowed and refused.retry_after == 12 * 3600
    rng = random.Random(7)
    waits = [int(retry_after(refused, rng)["Retry-After"]) for _ in range(200)]
    assert min(waits) >= 12 * 3600 and max(waits) <= 12 * 3600 + DAILY_RESET_SPREAD_S
    assert len(set(waits)) > 100  # spread, not one instant


async def test_retry_after_a_bucket_refusal_is_exact(redis_client: Redis, make_engine: MakeEngine) -> None:
    limits = LimitSet(buckets=(Bucket(name="b", counter="b", rate=1, period=10, burst=1),))
    engine = make_engine(redis_client)
    await engine.decide("ann", limits, 1, now=NOON)
    refused = await engine.decide("ann", limits, 1, now=NOON)
    assert {retry_after(refused, random.Random(s))["Retry-After"] for s in range(20)} == {"10"}


@pytest.fixture
def client(redis_url: str, upstream: StubUpstream, config: Config) -> Iterator[TestClient]:
    app = create_app(settings_for(redis_url, upstream.url), config, registry=CollectorRegistry())
    with TestClient(app) as client:
        yield client


def _ietf(field: str, name: str) -> dict[str, int]:
    entry = next(e for e in field.split(", ") if e.startswith(f'"{name}"'))
    return {k: int(v) for k, v in re.findall(r";(\w)=(\d+)", entry)}


async def test_answers_carry_openai_fields_and_a_refusal_retries_after_the_reset(
    client: TestClient, redis_client: Redis
) -> None:
    key = await key_store(redis_client).create_key("ann", "free")
    headers = {"Authorization": f"Bearer {key}"}
    served = client.post(PATH, json={"prompt": "x", "n": 2}, headers=headers)
    assert served.status_code == 200
    assert served.headers["x-ratelimit-limit-requests"] == "10"  # the free bucket's burst
    assert served.headers["x-ratelimit-remaining-requests"] == "8"
    assert re.fullmatch(r"\d+(\.\d+)?s", served.headers["x-ratelimit-reset-requests"])
    assert served.headers["x-ratelimit-limit-images"] == "3"
    assert served.headers["x-ratelimit-remaining-images"] == "1"
    assert re.fullmatch(r"(\d+h)?\d+m\d+s|\d+(\.\d+)?s", served.headers["x-ratelimit-reset-images"])

    waits = []
    for _ in range(8):
        refused = client.post(PATH, json={"prompt": "x", "n": 2}, headers=headers)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        assert refused.headers["x-ratelimit-remaining-images"] == "1"
        reset = _ietf(refused.headers["RateLimit"], "free-daily")["t"]
        assert reset <= int(refused.headers["Retry-After"]) <= reset + DAILY_RESET_SPREAD_S
        waits.append(int(refused.headers["Retry-After"]))
    assert len(set(waits)) > 1


async def test_a_plan_without_a_daily_limit_has_no_images_fields(client: TestClient, redis_client: Redis) -> None:
    key = await key_store(redis_client).create_key("pat", "pro")
    served = client.post(PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"})
    assert served.headers["x-ratelimit-limit-requests"] == "100"
    assert "x-ratelimit-limit-images" not in served.headers
