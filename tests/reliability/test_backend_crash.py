"""The backend killed (SIGKILL) in the middle of a batch: every charge refunded, 502/503, the gateway stays up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Service, ServiceSet
from tests.support.quotas import IMAGES as PATH
from tests.support.readings import images_used, metric

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REQUESTS = 8
# One batch of 8 slow images (256 px, 8 steps), gathered for up to 2 s: seconds of inference to kill.
BACKEND_ARGS = ("--sizes", "256x256", "--max-steps", "8", "--max-wait-ms", "2000")


async def batch_running(backend: Service, redis_url: str, quotas: Path, account: str) -> bool:
    """Every request charged and handed over, none waiting, no image made yet."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(backend.url + "/metrics")).text
    return (
        await images_used(redis_url, quotas, account, "paid") == REQUESTS
        and metric(text, "quotagate_backend_queue_depth_images") == 0
        and metric(text, "quotagate_backend_batch_images_count") == 0
        and metric(text, "quotagate_backend_images_generated_total") == 0
    )


async def test_backend_killed_mid_batch_refunds_every_charge_and_the_gateway_stays_up(
    services: ServiceSet, quotas: Path, redis_url: str
) -> None:
    gateway, backend = services.stack(quotas, redis_url, *BACKEND_ARGS)
    key = await services.create_key(redis_url, "studio", "paid")
    body = {"prompt": "a lighthouse", "size": "256x256", "steps": 8}

    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        sent = [asyncio.create_task(client.post(gateway.url + PATH, json=body)) for _ in range(REQUESTS)]
        deadline = time.monotonic() + 60
        while not await batch_running(backend, redis_url, quotas, "studio"):
            assert time.monotonic() < deadline and not any(task.done() for task in sent), "the batch never started"
            await asyncio.sleep(0.02)
        backend.kill()
        answers = await asyncio.gather(*sent)

        assert {answer.status_code for answer in answers} <= {502, 503}
        assert all(answer.json()["error"]["message"] for answer in answers)
        assert await images_used(redis_url, quotas, "studio", "paid") == 0
        # Still up: health answers, and a request to the dead backend fails fast and is refunded too.
        assert (await client.get(gateway.url + "/healthz")).status_code == 200
        after = await client.post(gateway.url + PATH, json=body)
        assert after.status_code == 502
        assert await images_used(redis_url, quotas, "studio", "paid") == 0
    assert gateway.process.poll() is None
