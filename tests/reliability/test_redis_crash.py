"""Redis killed with SIGKILL under load, then restarted from its append-only file.

Redis here runs as `quotagate up` runs it: `appendonly yes`, `appendfsync everysec`. A crash can lose
what was written since the last fsync: about one second of charges, and up to two when an fsync is
slow (Redis then postpones the next one). Nothing older may be lost, no request may hang while Redis
is down, each plan's `on_store_failure` (closed, or open within its budget) must be what happens,
and the gateway must admit again within 2 s of Redis answering.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.ops.embedded_redis import RedisServer
from tests.ports import free_port
from tests.support.processes import Service, ServiceSet
from tests.support.quotas import IMAGES as PATH
from tests.support.quotas import RELIABILITY_QUOTAS as QUOTAS
from tests.support.readings import images_used

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WORKERS = 8
FSYNC_WINDOW = 2.0  # seconds of writes a crash may lose (everysec, plus one postponed fsync)
ANSWER_WITHIN = 5.0  # no request may take longer while Redis is down (the Redis timeout is 0.5 s)
RECOVER_WITHIN = 2.0
BUDGET = "{images: 30, per: minute, burst: 10}"  # what an `open` plan may admit per replica without Redis
BUDGET_BURST, BUDGET_PER_S = 10, 0.5
FAILURE_MODES = {
    "closed": "    on_store_failure: closed\n",
    "open": f"    on_store_failure: open\n    store_failure_budget: {BUDGET}\n",
}


async def send(session: aiohttp.ClientSession, gateway: Service) -> tuple[int, float, str | None]:
    """Status, seconds taken, and the error code of one request."""
    started = time.monotonic()
    async with session.post(gateway.url + PATH, json={"prompt": "a lighthouse"}) as answer:
        payload = await answer.json()
    code = payload["error"]["code"] if answer.status != 200 else None
    return answer.status, time.monotonic() - started, code


async def rewrite_aof(redis: RedisServer) -> None:
    """BGREWRITEAOF, awaited: the rewritten file is fsynced, so all written so far survives a crash."""
    async with Redis.from_url(redis.url) as client:
        await client.bgrewriteaof()
        deadline = time.monotonic() + 10
        while True:
            info = await client.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                break
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.01)
        assert info["aof_last_bgrewrite_status"] == "ok"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("mode", FAILURE_MODES)
async def test_redis_killed_mid_load_loses_at_most_the_fsync_window_and_recovers_within_two_seconds(
    services: ServiceSet, quotas: Path, redis: RedisServer, mode: str
) -> None:
    daily = "    daily_images: 100000\n"
    await asyncio.to_thread(quotas.write_text, QUOTAS.replace(daily, daily + FAILURE_MODES[mode]))
    stub = services.stub_upstream()
    gateway = services.gateway("gateway", quotas, redis.url, stub.url)
    stub.wait_ready()
    gateway.wait_ready()
    key = await services.create_key(redis.url, "steady", "paid")
    admitted_at: list[float] = []

    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def steady(requests: int) -> None:
            for _ in range(requests):
                status, _, _ = await send(session, gateway)
                assert status == 200
                admitted_at.append(time.monotonic())

        await asyncio.gather(*(steady(75) for _ in range(WORKERS)))
        await rewrite_aof(redis)  # what was admitted until now is on disk, whatever the fsync timing
        durable = len(admitted_at)
        await asyncio.gather(*(steady(75) for _ in range(WORKERS)))
        killed_at = time.monotonic()
        redis.kill()

        # Down: every request is answered at once. `closed` refuses all with a 503 that says why; `open`
        # admits what its budget allows in this replica (never charged in Redis), then refuses too.
        down_at = time.monotonic()
        down = await asyncio.gather(*(send(session, gateway) for _ in range(WORKERS * 10)))
        down_for = time.monotonic() - down_at
        outcomes = Counter((status, code) for status, _, code in down)
        admitted_while_down = outcomes.pop((200, None), 0)
        assert outcomes == {(503, "service_unavailable"): len(down) - admitted_while_down}
        if mode == "closed":
            assert admitted_while_down == 0
        else:
            assert BUDGET_BURST <= admitted_while_down <= BUDGET_BURST + 1 + int(down_for * BUDGET_PER_S)
        assert max(seconds for _, seconds, _ in down) < ANSWER_WITHIN

        redis.start()  # the same directory: the AOF is replayed
        back_at = time.monotonic()
        while (await send(session, gateway))[0] != 200:
            assert time.monotonic() - back_at < RECOVER_WITHIN, gateway.log.read_text()
            await asyncio.sleep(0.01)

    kept = await images_used(redis.url, quotas, "steady", "paid") - 1  # less the probe that saw recovery
    in_window = sum(1 for at in admitted_at if at > killed_at - FSYNC_WINDOW)
    assert kept >= durable
    assert len(admitted_at) - in_window <= kept <= len(admitted_at), (kept, len(admitted_at), in_window)
