"""Engine.usage: today's units per daily quota, unlimited ones included; an earlier day's are not today's."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis

from limits import Bucket, DailyQuota, LimitSet
from tests.conftest import MakeEngine

pytestmark = pytest.mark.anyio

NOON = 1_800_000_000.0 - 1_800_000_000.0 % 86400 + 12 * 3600  # a UTC noon


def limits(daily: int | None) -> LimitSet:
    return LimitSet(
        buckets=(Bucket(name="r", counter="rate", rate=100, period=60, burst=100),),
        quotas=(DailyQuota(name="d", counter="daily", limit=daily, timezone=ZoneInfo("UTC")),),
    )


@pytest.mark.parametrize("daily", [10, None])
async def test_usage_counts_today_only(redis_client: Redis, daily: int | None, make_engine: MakeEngine) -> None:
    engine = make_engine(redis_client)
    assert (await engine.usage("ann", limits(daily), now=NOON))[1] == {"d": 0}
    await engine.decide("ann", limits(daily), 3, now=NOON)
    await engine.decide("ann", limits(daily), 2, now=NOON + 60)
    decision, used = await engine.usage("ann", limits(daily), now=NOON + 120)
    assert used == {"d": 5}
    assert decision.states[1].remaining == (None if daily is None else 5)
    assert (await engine.usage("ann", limits(daily), now=NOON + 86400))[1] == {"d": 0}  # the next day
