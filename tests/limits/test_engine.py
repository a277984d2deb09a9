"""The engine against a real redis-server: buckets, daily quotas, all-or-nothing, refunds."""

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


def free_plan(daily: int | None = 3, rate: int = 6, burst: int = 3) -> LimitSet:
    return LimitSet(
        buckets=(Bucket("free-rate", "rate", rate=rate, period=60, burst=burst),),
        quotas=(DailyQuota("free-daily", "daily", limit=daily, timezone=UTC),),
    )


async def test_daily_quota_admits_three_then_refuses_until_midnight(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), free_plan(rate=600, burst=10)
    outcomes = [await engine.decide("alice", limits, 1, now=NOON + i) for i in range(4)]

    assert [d.allowed for d in outcomes] == [True, True, True, False]
    assert [d.states[1].remaining for d in outcomes] == [2, 1, 0, 0]
    refused = outcomes[3]
    assert refused.denied_by is not None and refused.denied_by.limit.name == "free-daily"
    assert refused.retry_after == pytest.approx(12 * 3600 - 3)


async def test_new_day_starts_a_new_count(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), free_plan(rate=600, burst=10)
    for i in range(3):
        assert (await engine.decide("alice", limits, 1, now=NOON + i)).allowed
    tomorrow = NOON + 86400
    decision = await engine.decide("alice", limits, 1, now=tomorrow)
    assert decision.allowed and decision.states[1].remaining == 2


async def test_bucket_refuses_past_its_burst_and_refills_at_its_rate(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), free_plan(daily=None, rate=6, burst=3)
    assert (await engine.decide("bob", limits, 3, now=NOON)).allowed
    refused = await engine.decide("bob", limits, 1, now=NOON)
    assert not refused.allowed
    assert refused.denied_by is not None and refused.denied_by.limit.name == "free-rate"
    assert refused.retry_after == pytest.approx(10.0)  # 6 per minute: one unit every 10 s
    assert not (await engine.decide("bob", limits, 1, now=NOON + 9.9)).allowed
    assert (await engine.decide("bob", limits, 1, now=NOON + 10)).allowed


async def test_refusal_by_one_limit_consumes_none(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), free_plan(daily=3, rate=6, burst=2)
    assert (await engine.decide("carol", limits, 2, now=NOON)).allowed
    # The bucket is empty now; the quota still has 1 left and must keep it.
    assert not (await engine.decide("carol", limits, 1, now=NOON)).allowed
    later = await engine.peek("carol", limits, now=NOON + 60)
    assert later.states[1].remaining == 1


async def test_unlimited_quota_never_refuses_but_counts(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), free_plan(daily=None, rate=6000, burst=100)
    for i in range(50):
        assert (await engine.decide("dora", limits, 2, now=NOON + i)).allowed
    raw = await redis_client.hget("qg:{dora}:daily", "u")
    assert raw == b"100"


async def test_cost_above_what_a_limit_can_ever_hold_is_never_admitted(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), free_plan(daily=3, rate=600, burst=10)
    decision = await engine.decide("erin", limits, 4, now=NOON)
    assert not decision.allowed and decision.retry_after is None


async def test_refund_returns_exactly_what_was_taken(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), free_plan(daily=3, rate=6, burst=3)
    decision = await engine.decide("fay", limits, 2, now=NOON)
    await engine.refund("fay", limits, decision, now=NOON)
    after = await engine.peek("fay", limits, now=NOON)
    assert [s.remaining for s in after.states] == [3, 3]


async def test_refund_never_goes_below_zero_or_past_the_burst(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), free_plan(daily=3, rate=6, burst=3)
    decision = await engine.decide("gus", limits, 1, now=NOON)
    await redis_client.hset("qg:{gus}:daily", "u", 0)  # support reset the day meanwhile
    await engine.refund("gus", limits, decision, now=NOON + 600)  # the bucket refilled meanwhile
    after = await engine.peek("gus", limits, now=NOON + 600)
    assert [s.remaining for s in after.states] == [3, 3]


async def test_refund_after_midnight_leaves_the_new_day_alone(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), free_plan(daily=3, rate=600, burst=10)
    decision = await engine.decide("hal", limits, 1, now=NOON)
    tomorrow = NOON + 86400
    assert (await engine.decide("hal", limits, 1, now=tomorrow)).allowed
    await engine.refund("hal", limits, decision, now=tomorrow)
    assert (await engine.peek("hal", limits, now=tomorrow)).states[1].remaining == 2


async def test_server_clock_is_used_when_no_time_is_given(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), free_plan()
    seconds, micros = await redis_client.time()
    decision = await engine.decide("ivy", limits, 1)
    assert abs(decision.now_us - (seconds * 1_000_000 + micros)) < 5_000_000
    assert decision.allowed


async def test_keys_of_one_account_share_a_cluster_hash_tag(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), free_plan()
    await engine.decide("jo", limits, 1, now=NOON)
    keys = sorted(k.decode() for k in await redis_client.keys("*"))
    assert keys == ["qg:{jo}:daily", "qg:{jo}:rate"]
    assert [await redis_client.pttl(k) > 0 for k in keys] == [True, True]


async def test_refusal_names_the_limit_that_keeps_the_client_waiting_longest(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), free_plan(daily=3, rate=6, burst=3)
    assert (await engine.decide("kim", limits, 3, now=NOON)).allowed
    refused = await engine.decide("kim", limits, 1, now=NOON)  # both the bucket and the day refuse
    assert refused.denied_by is not None and refused.denied_by.limit.name == "free-daily"
    assert refused.retry_after == pytest.approx(12 * 3600)


def test_a_bucket_faster_than_one_unit_per_microsecond_is_refused() -> None:
    # The scripts count in whole microseconds: such a bucket would refill in 0 µs and expire at once.
    assert Bucket("fast", "rate", rate=1_000_000, period=1, burst=1).interval_us == 1
    with pytest.raises(ValueError, match="at most 1,000,000 units per second"):
        Bucket("faster", "rate", rate=1_000_001, period=1, burst=1)
