"""Idempotency keys, grants and resets, the denial near-cache, coalescing, and DST days."""

from __future__ import annotations

import asyncio
import gc
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis

from limits import Bucket, DailyQuota, LimitSet, coalesce
from limits.nearcache import DenialCache
from tests.conftest import MakeEngine

pytestmark = pytest.mark.anyio

UTC = ZoneInfo("UTC")
PARIS = ZoneInfo("Europe/Paris")
NOON = datetime(2026, 11, 21, 12, 0, tzinfo=UTC).timestamp()


def plan(daily: int | None = 3, timezone: ZoneInfo = UTC) -> LimitSet:
    return LimitSet(
        buckets=(Bucket("free-rate", "rate", rate=600, period=60, burst=10),),
        quotas=(DailyQuota("free-daily", "daily", limit=daily, timezone=timezone),),
    )


async def test_a_refund_is_given_once_and_frees_the_idempotency_key(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), plan()
    decision = await engine.decide("ann", limits, 2, now=NOON, idempotency_key="req-1")
    await engine.refund("ann", limits, decision, now=NOON)
    await engine.refund("ann", limits, decision, now=NOON)  # a second refund gives nothing back
    other = await engine.decide("ann", limits, 1, now=NOON)
    assert other.states[1].remaining == 2
    retried = await engine.decide("ann", limits, 2, now=NOON, idempotency_key="req-1")
    assert retried.allowed and not retried.replayed and retried.states[1].remaining == 0


async def test_a_replayed_decision_is_never_refunded(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), plan()
    await engine.decide("ann", limits, 1, now=NOON, idempotency_key="k")
    replay = await engine.decide("ann", limits, 1, now=NOON, idempotency_key="k")
    await engine.refund("ann", limits, replay, now=NOON)
    assert (await engine.peek("ann", limits, now=NOON)).states[1].remaining == 2


async def test_grants_add_images_for_today_only(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), plan()
    for i in range(3):
        assert (await engine.decide("bo", limits, 1, now=NOON + i)).allowed
    assert not (await engine.decide("bo", limits, 1, now=NOON + 3)).allowed
    assert await engine.grant("bo", limits.quotas[0], 2, now=NOON + 4) == 2
    assert [(await engine.decide("bo", limits, 1, now=NOON + 5 + i)).allowed for i in range(3)] == [True, True, False]
    tomorrow = await engine.peek("bo", limits, now=NOON + 86400)
    assert tomorrow.states[1].remaining == 3


async def test_reset_forgets_the_day(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), plan()
    await engine.decide("cy", limits, 3, now=NOON)
    await engine.reset("cy", limits)
    assert [s.remaining for s in (await engine.peek("cy", limits, now=NOON)).states] == [10, 3]


async def test_near_cache_answers_an_exhausted_account_without_redis(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    cache = DenialCache(clock=lambda: NOON)
    engine, limits = make_engine(redis_client, near_cache=cache), plan()
    await engine.decide("dee", limits, 3, now=NOON)
    refused = await engine.decide("dee", limits, 1, now=NOON)
    assert not refused.allowed and not refused.cached
    await redis_client.flushall()  # were Redis asked, it would now admit
    cached = await engine.decide("dee", limits, 1, now=NOON + 60)
    assert not cached.allowed and cached.cached
    assert cached.retry_after == pytest.approx(refused.retry_after - 60)
    assert (await engine.decide("dee", limits, 1, now=NOON + 12 * 3600)).allowed  # past T: Redis again


async def test_near_cache_entries_stay_out_of_the_garbage_collectors_scans(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    cache = DenialCache(clock=lambda: NOON)
    engine, limits = make_engine(redis_client), plan()
    await engine.decide("gil", limits, 3, now=NOON)
    refused = await engine.decide("gil", limits, 1, now=NOON)
    gc.collect()
    tracked_before = len(gc.get_objects())
    for i in range(10_000):
        cache.remember(f"spent-{i}", limits, refused)
    for _ in range(3):  # a tuple of plain values stops being tracked once its items have, a level a collection
        gc.collect()
    # Held as Decision objects, 10,000 entries were ~90,000 objects every full collection scanned.
    assert len(gc.get_objects()) - tracked_before < 100
    served = cache.get("spent-9999", limits)
    assert served is not None and served.cached and served.retry_after == refused.retry_after


async def test_near_cache_ignores_a_bucket_refusal_and_a_changed_limit(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    cache = DenialCache()
    engine = make_engine(redis_client, near_cache=cache)
    tight = LimitSet(
        buckets=(Bucket("r", "rate", rate=1, period=3600, burst=1),),
        quotas=(DailyQuota("d", "daily", limit=3, timezone=UTC),),
    )
    await engine.decide("eve", tight, 1, now=NOON)
    assert not (await engine.decide("eve", tight, 1, now=NOON)).allowed
    assert cache.get("eve", tight, NOON) is None  # a bucket refills: never cached

    await engine.decide("fox", plan(), 3, now=NOON)
    await engine.decide("fox", plan(), 1, now=NOON)
    assert cache.get("fox", plan(), NOON) is not None
    assert cache.get("fox", plan(daily=5), NOON) is None  # ops raised the quota: ask Redis


async def test_grants_on_any_replica_invalidate_every_replicas_near_cache(
    redis_url: str, make_engine: MakeEngine
) -> None:
    clients = [Redis.from_url(redis_url) for _ in range(2)]
    caches = [DenialCache(), DenialCache()]
    engines = [make_engine(c, near_cache=cache) for c, cache in zip(clients, caches, strict=True)]
    stop = asyncio.Event()
    followers = [asyncio.create_task(cache.follow(c, stop)) for c, cache in zip(clients, caches, strict=True)]
    try:
        limits = plan()
        await engines[0].decide("gil", limits, 3)
        assert not (await engines[0].decide("gil", limits, 1)).allowed
        assert caches[0].get("gil", limits) is not None
        await asyncio.sleep(0.2)  # let both followers subscribe
        await engines[1].grant("gil", limits.quotas[0], 1)
        for _ in range(100):
            if caches[0].get("gil", limits) is None:
                break
            await asyncio.sleep(0.01)
        assert (await engines[0].decide("gil", limits, 1)).allowed
    finally:
        stop.set()
        await asyncio.wait(followers)
        for c in clients:
            await c.aclose()


@pytest.mark.parametrize("delay", [0, 0.001, 0.005, 0.05])
async def test_the_invalidation_follower_ends_when_told_even_while_connecting(redis_url: str, delay: float) -> None:
    client, stop = Redis.from_url(redis_url), asyncio.Event()
    follower = asyncio.create_task(DenialCache().follow(client, stop))
    await asyncio.sleep(delay)
    stop.set()
    follower.cancel()  # may be swallowed inside redis-py while it connects; the flag still ends the loop
    done, _ = await asyncio.wait([follower], timeout=10)
    await client.aclose()
    assert done == {follower}


async def test_concurrent_decisions_travel_in_one_write(
    redis_client: Redis, monkeypatch: Any, make_engine: MakeEngine
) -> None:
    sizes: list[int] = []
    write = coalesce._Link.write

    def counting(self: Any, calls: list[Any]) -> None:
        sizes.append(len(calls))
        write(self, calls)

    monkeypatch.setattr(coalesce._Link, "write", counting)
    engine, limits = make_engine(redis_client), plan(daily=None)
    decisions = await asyncio.gather(*(engine.decide(f"u{i}", limits, 1, now=NOON) for i in range(64)))
    assert all(d.allowed for d in decisions)
    assert sizes == [64]
    await engine.decide("lone", limits, 1, now=NOON)
    assert sizes == [64, 1]


async def test_scripts_are_reloaded_after_redis_forgets_them(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), plan()
    assert (await engine.decide("hy", limits, 1, now=NOON)).allowed
    await redis_client.script_flush()
    results = await asyncio.gather(*(engine.decide("hy", limits, 1, now=NOON) for _ in range(3)))
    assert [r.allowed for r in results] == [True, True, False]


@pytest.mark.parametrize(
    "local_day,hours",
    [((2026, 3, 29), 23), ((2026, 10, 25), 25), ((2026, 11, 21), 24)],
    ids=["spring-forward", "fall-back", "ordinary"],
)
async def test_daily_quota_resets_at_local_midnight_on_dst_days(
    redis_client: Redis, local_day: tuple[int, int, int], hours: int, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), plan(timezone=PARIS)
    midnight = datetime(*local_day, 0, 0, tzinfo=PARIS).timestamp()
    await engine.decide("ida", limits, 3, now=midnight + 1)
    refused = await engine.decide("ida", limits, 1, now=midnight + 1)
    assert refused.retry_after == pytest.approx(hours * 3600 - 1)
    assert not (await engine.decide("ida", limits, 1, now=midnight + hours * 3600 - 1)).allowed
    assert (await engine.decide("ida", limits, 1, now=midnight + hours * 3600)).allowed
