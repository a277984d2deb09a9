"""A client that hangs up while its request waits in the real backend's queue: withdrawn, refunded, no image made.

Real gateway and backend processes (the tiny model). Higher-priority work sent straight to the backend keeps
its one worker busy, so the client's request is still queued when the client closes its socket.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.processes import Service, ServiceSet
from tests.support.quotas import IMAGES as PATH
from tests.support.readings import images_used, metric

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BLOCKERS = 3
BLOCKER_IMAGES = 4
BACKEND_ARGS = ("--sizes", "64x64,256x256", "--max-steps", "8", "--max-batch-images", "4", "--max-wait-ms", "0")
# Straight to the backend, ahead of anything the gateway forwards for a free plan.
BLOCKER = {"prompt": "a slow lighthouse", "n": BLOCKER_IMAGES, "size": "256x256", "steps": 8}
PRIORITY = {"X-Quotagate-Priority": "1000"}


async def backend_metric(backend: Service, name: str) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        return metric((await client.get(backend.url + "/metrics")).text, name)


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for `condition()` to hold; the bound only stops a hung test."""
    deadline = time.monotonic() + 60
    while not await condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


async def test_a_client_gone_while_queued_is_refunded_and_costs_no_image(
    services: ServiceSet, quotas: Path, redis_url: str
) -> None:
    gateway, backend = services.stack(quotas, redis_url, *BACKEND_ARGS)
    key = await services.create_key(redis_url, "ann", "free")
    queued_images = (BLOCKERS - 1) * BLOCKER_IMAGES  # one blocker runs, the others wait

    async with httpx.AsyncClient(timeout=120) as client:
        blockers = [
            asyncio.create_task(client.post(backend.url + PATH, json=BLOCKER, headers=PRIORITY))
            for _ in range(BLOCKERS)
        ]

        async def busy() -> bool:
            return await backend_metric(backend, "quotagate_backend_queue_depth_images") == queued_images

        await until(busy, "the blockers hold the worker")
        parts = urlsplit(gateway.url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        body = json.dumps({"prompt": "left in the queue", "n": 1, "size": "64x64", "steps": 1}).encode()
        head = f"POST {PATH} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()

        async def victim_queued() -> bool:
            return await backend_metric(backend, "quotagate_backend_queue_depth_images") == queued_images + 1

        await until(victim_queued, "the client's request is queued behind the blockers")
        writer.close()  # the client hangs up
        await writer.wait_closed()

        async def settled() -> bool:
            text = (await client.get(gateway.url + "/metrics")).text
            return metric(text, "quotagate_requests_total", plan="free", outcome="client_gone") >= 1

        await until(settled, "the gateway settled the request")
        answers = await asyncio.gather(*blockers)
        assert [answer.status_code for answer in answers] == [200] * BLOCKERS
        # Anything still queued at the same priority as the client's request ran by the time this one answers.
        sentinel = await client.post(backend.url + PATH, json={"prompt": "after", "n": 1, "size": "64x64"})
        assert sentinel.status_code == 200

        assert await images_used(redis_url, quotas, "ann", "free") == 0
        made = await backend_metric(backend, "quotagate_backend_images_generated_total")
        assert made == BLOCKERS * BLOCKER_IMAGES + 1  # the blockers' and the sentinel's, none for the client
        assert await backend_metric(backend, "quotagate_backend_withdrawn_total") == 1
        text = (await client.get(gateway.url + "/metrics")).text
        assert metric(text, "quotagate_images_refunded_total", plan="free", reason="withdrawn") == 1
        assert metric(text, "quotagate_images_refunded_total") == 1
