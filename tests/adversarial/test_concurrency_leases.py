"""Per-account concurrent places in Redis: the places of a replica that died come back once its leases lapse."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from limits import Engine, connect
from tests.conftest import MakeEngine

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0
TTL = 30.0


async def test_a_killed_replicas_places_come_back_when_its_leases_lapse(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine = make_engine(redis_client)
    held = [await engine.lease("ann", 2, TTL, now=NOW) for _ in range(2)]  # the replica then dies
    assert all(held)
    assert await engine.lease("ann", 2, TTL, now=NOW + TTL - 1) is None
    assert await engine.lease("bob", 2, TTL, now=NOW + TTL - 1) is not None  # another account's own
    assert await engine.lease("ann", 2, TTL, now=NOW + TTL) is not None  # lapsed: a place is back


async def test_a_renewed_lease_keeps_its_place_and_a_released_one_frees_it(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine = make_engine(redis_client)
    lease = await engine.lease("ann", 1, TTL, now=NOW)
    assert lease is not None
    assert await engine.renew(lease, TTL, now=NOW + TTL - 1)
    assert await engine.lease("ann", 1, TTL, now=NOW + TTL + 1) is None  # renewed: still held
    await engine.release(lease)
    assert not await engine.renew(lease, TTL, now=NOW + TTL + 1)  # released: not taken back
    assert await engine.lease("ann", 1, TTL, now=NOW + TTL + 1) is not None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(1, 5), attempts=st.integers(1, 12))
async def test_never_more_leases_than_the_limit(redis_url: str, limit: int, attempts: int) -> None:
    redis = connect(redis_url)
    try:
        async with Engine(redis) as engine:
            account = f"ann-{uuid.uuid4().hex}"  # a fresh account per example, the Redis kept
            taken = [await engine.lease(account, limit, TTL, now=NOW) for _ in range(attempts)]
            assert sum(lease is not None for lease in taken) == min(limit, attempts)
    finally:
        await redis.aclose()
