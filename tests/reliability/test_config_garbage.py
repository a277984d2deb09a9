"""The quota file replaced with garbage while requests flow: the old config stays, no request fails."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import httpx
import pytest

from gateway.config.quotas import load_config
from tests.support.processes import Service, ServiceSet
from tests.support.quotas import IMAGES as PATH
from tests.support.quotas import RELIABILITY_QUOTAS as QUOTAS
from tests.support.readings import metric

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

GARBAGE = {
    "not UTF-8": b"timezone: UTC\nplans: \xff\xfe\x80\n",
    "not YAML": b"plans: [free, {\n",
    "empty": b"",
    "half-written save": QUOTAS[: len(QUOTAS) // 2].encode(),
    "a bad value": QUOTAS.replace("burst: 100", "burst: 0").encode(),
    "an unknown key": QUOTAS.replace("timezone: UTC", "timezone: UTC\ntimezon: UTC").encode(),
    "random bytes": random.Random(7).randbytes(512),
}
WORKERS = 8


async def refusals(gateway: Service) -> float:
    """Reloads the gateway refused so far."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(gateway.url + "/metrics")).text
    return metric(text, "quotagate_config_reloads_total", result="failure")


async def version(gateway: Service) -> str:
    async with httpx.AsyncClient() as client:
        return str((await client.get(gateway.url + "/readyz")).json()["config_version"])


async def test_garbage_quota_files_mid_load_keep_the_old_config_and_fail_no_request(
    services: ServiceSet, quotas: Path, redis_url: str
) -> None:
    stub = services.stub_upstream()
    gateway = services.gateway("gateway", quotas, redis_url, stub.url, {"QUOTAGATE_CONFIG_POLL": "0.05"})
    stub.wait_ready()
    gateway.wait_ready()
    key = await services.create_key(redis_url, "steady", "paid")
    before = await version(gateway)
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()

    async def load(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with session.post(gateway.url + PATH, json={"prompt": "a lighthouse"}) as answer:
                await answer.read()
                statuses[answer.status] += 1

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        senders = [asyncio.create_task(load(session)) for _ in range(WORKERS)]
        try:
            for name, garbage in GARBAGE.items():
                refused = await refusals(gateway)
                await asyncio.to_thread(quotas.write_bytes, garbage)
                gateway.process.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while await refusals(gateway) <= refused:
                    assert time.monotonic() < deadline, f"{name}: never refused\n{gateway.log.read_text()}"
                    await asyncio.sleep(0.02)
                assert await version(gateway) == before, name
            # The reload machinery survived all of it: a good file is still applied.
            await asyncio.to_thread(quotas.write_text, QUOTAS.replace("daily_images: 3", "daily_images: 5"))
            deadline = time.monotonic() + 10
            while await version(gateway) != load_config(quotas).version:
                assert time.monotonic() < deadline, gateway.log.read_text()
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.gather(*senders)

    assert set(statuses) == {200}, statuses
    assert statuses[200] > len(GARBAGE) * WORKERS
