"""The engine's own connection: it gives up on a Redis that stops answering and comes back with Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
from redis.asyncio import Redis

from gateway.embedded_redis import RedisServer
from limits import Bucket, DailyQuota, Engine, LimitSet, StoreUnavailable, connect

pytestmark = pytest.mark.anyio

FREE = LimitSet(
    buckets=(Bucket("free-rate", "rate", rate=600, period=60, burst=10),),
    quotas=(DailyQuota("free-daily", "daily", limit=3, timezone=ZoneInfo("UTC")),),
)


async def test_a_redis_that_stops_answering_fails_every_waiting_call_within_the_timeout(redis_url: str) -> None:
    client = connect(redis_url, timeout=0.2)
    try:
        engine = Engine(client)
        assert (await engine.decide("ann", FREE, 1)).allowed
        with redis.Redis.from_url(redis_url) as admin:
            admin.client_pause(3000)  # Redis takes the commands and answers none for 3 s
        calls = [asyncio.create_task(engine.decide(f"u{i}", FREE, 1)) for i in range(8)]
        done, _ = await asyncio.wait(calls, timeout=2)
        assert done == set(calls)  # nobody waited for the pause to end
        assert all(isinstance(call.exception(), StoreUnavailable) for call in calls)
        with redis.Redis.from_url(redis_url) as admin:
            admin.client_unpause()
        assert (await engine.decide("ann", FREE, 1)).states[1].remaining == 1  # a new connection, same counts
    finally:
        await client.aclose()


async def test_the_engine_reconnects_when_redis_comes_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = connect(server.url, timeout=0.5)
    try:
        engine = Engine(client)
        assert (await engine.decide("bob", FREE, 2)).allowed
        server.kill()
        with pytest.raises(StoreUnavailable):
            await engine.decide("bob", FREE, 1)
        server.start()  # AOF brings the counts back
        decision = await engine.decide("bob", FREE, 1)
        assert decision.allowed and decision.states[1].remaining == 0
    finally:
        await client.aclose()
        server.stop()


async def test_closing_the_client_closes_the_engines_connection(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    engine = Engine(client)
    await engine.decide("cy", FREE, 1)
    with redis.Redis.from_url(redis_url) as admin:
        assert len(admin.client_list()) == 2  # the engine's and the admin's
        await client.aclose()
        for _ in range(100):
            if len(admin.client_list()) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(admin.client_list()) == 1


async def test_a_lone_decision_is_written_at_once_and_those_behind_a_reply_together(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        engine = Engine(client)
        await engine.decide("dee", FREE, 1)  # the engine's connection is open
        coalescer = engine._coalescer
        assert coalescer is not None
        lone = asyncio.ensure_future(engine.decide("dee", FREE, 1))
        await asyncio.sleep(0)  # one loop pass: the call has run up to its wait for the reply
        assert len(coalescer._sent) == 1 and not coalescer._queue  # written then, not at the turn's end
        await lone
        calls = [asyncio.ensure_future(engine.decide(f"e{i}", FREE, 1)) for i in range(4)]
        await asyncio.sleep(0)
        assert len(coalescer._sent) == 1 and len(coalescer._queue) == 3  # the rest wait for the turn's end
        assert all(decision.allowed for decision in await asyncio.gather(*calls))
    finally:
        await client.aclose()
