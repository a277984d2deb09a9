"""Shadow mode: a limit that is computed and reported but never refuses, and takes nothing when it would have."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis

from limits import Bucket, DailyQuota, LimitSet
from tests.conftest import MakeEngine

pytestmark = pytest.mark.anyio

UTC = ZoneInfo("UTC")
NOON = datetime(2026, 11, 21, 12, 0, tzinfo=UTC).timestamp()


def limits(*, shadow_rate: bool = False, shadow_daily: bool = False) -> LimitSet:
    return LimitSet(
        buckets=(Bucket("free-rate", "rate", rate=60, period=3600, burst=2, shadow=shadow_rate),),
        quotas=(DailyQuota("free-daily", "daily", limit=1, timezone=UTC, shadow=shadow_daily),),
    )


async def test_a_shadow_quota_reports_refusals_but_admits(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, shadowed = make_engine(redis_client), limits(shadow_daily=True)
    first, second = [await engine.decide("ann", shadowed, 1, now=NOON + i) for i in range(2)]

    assert first.allowed and first.shadow_refusals == ()
    assert second.allowed and second.denied_by is None
    (refusal,) = second.shadow_refusals
    assert refusal.limit.name == "free-daily" and refusal.remaining == 0
    assert second.retry_after == 0  # only enforced limits make a client wait
    # It took nothing when it would have refused, as an enforced quota would not have; the bucket did.
    after = await engine.peek("ann", shadowed, now=NOON + 2)
    assert [s.remaining for s in after.states] == [0, 0]


async def test_an_enforced_limit_still_refuses_beside_a_shadow_one(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, shadowed = make_engine(redis_client), limits(shadow_daily=True)
    answers = [await engine.decide("bo", shadowed, 1, now=NOON) for _ in range(3)]
    assert [a.allowed for a in answers] == [True, True, False]
    assert answers[2].denied_by is not None and answers[2].denied_by.limit.name == "free-rate"


async def test_a_request_an_enforced_limit_refuses_charges_no_shadow_limit(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, shadowed = make_engine(redis_client), limits(shadow_rate=True)
    assert (await engine.decide("cy", shadowed, 1, now=NOON)).allowed
    tat = await redis_client.get("qg:{cy}:rate")
    refused = await engine.decide("cy", shadowed, 1, now=NOON)  # the enforced quota (1 a day) is spent
    assert not refused.allowed and refused.denied_by is not None and refused.denied_by.limit.name == "free-daily"
    assert refused.shadow_refusals == ()  # the bucket would have admitted it
    assert await redis_client.get("qg:{cy}:rate") == tat


async def test_a_refund_gives_back_only_what_was_charged(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine = make_engine(redis_client)
    shadowed = LimitSet(
        buckets=(Bucket("free-rate", "rate", rate=60, period=3600, burst=1, shadow=True),),
        quotas=(DailyQuota("free-daily", "daily", limit=5, timezone=UTC),),
    )
    first = await engine.decide("di", shadowed, 1, now=NOON)
    second = await engine.decide("di", shadowed, 1, now=NOON)  # the shadow bucket would refuse
    assert second.allowed and [s.limit.name for s in second.shadow_refusals] == ["free-rate"]
    await engine.refund("di", shadowed, second, now=NOON)

    after = await engine.peek("di", shadowed, now=NOON)
    assert after.states[1].remaining == 4  # the quota got its image back
    assert after.states[0].remaining == 0  # the bucket keeps the first request's charge: it took none for the second
    await engine.refund("di", shadowed, first, now=NOON)
    assert [s.remaining for s in (await engine.peek("di", shadowed, now=NOON)).states] == [1, 5]
