"""Replicas whose clocks disagree by hours still agree on every decision: time comes from Redis."""

from __future__ import annotations

import time
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis

from limits import Bucket, ClockSkew, DailyQuota, LimitSet
from tests.conftest import MakeEngine

pytestmark = pytest.mark.anyio

LIMITS = LimitSet(
    buckets=(Bucket("free-rate", "rate", rate=600, period=60, burst=10),),
    quotas=(DailyQuota("free-daily", "daily", limit=3, timezone=ZoneInfo("UTC")),),
)


async def test_replicas_hours_apart_share_one_day_and_one_count(redis_client: Redis, make_engine: MakeEngine) -> None:
    behind = make_engine(redis_client, clock=lambda: time.time() - 20 * 3600)
    ahead = make_engine(redis_client, clock=lambda: time.time() + 20 * 3600)
    decisions = [await engine.decide("ann", LIMITS, 1) for engine in (behind, ahead, behind, ahead, behind)]

    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert len({d.states[1].day_start_us for d in decisions}) == 1
    server_seconds, _ = await redis_client.time()
    day_start = decisions[0].states[1].day_start_us / 1e6
    assert day_start <= server_seconds < day_start + 86400  # the day that holds Redis's time


async def test_a_replica_more_than_a_day_off_is_refused_not_miscounted(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    lost = make_engine(redis_client, clock=lambda: time.time() - 3 * 86400)
    with pytest.raises(ClockSkew):
        await lost.decide("ann", LIMITS, 1)
    assert await redis_client.exists("qg:{ann}:daily") == 0
