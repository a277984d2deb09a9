"""Four gateway processes, 500 concurrent requests each, one free account: exactly 3 images admitted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from .conftest import PATH, create_key
from .processes import ServiceSet

pytestmark = pytest.mark.anyio

GATEWAYS = 4
PER_GATEWAY = 500


async def test_four_gateways_and_two_thousand_concurrent_requests_admit_exactly_the_daily_three(
    services: ServiceSet, quotas: Path, redis_url: str
) -> None:
    stub = services.stub_upstream()
    gateways = [services.gateway(f"gateway-{i}", quotas, redis_url, stub.url) for i in range(GATEWAYS)]
    for service in [stub, *gateways]:
        service.wait_ready()
    key = await create_key(services, redis_url, "launch-day", "free")
    body = {"prompt": "a lighthouse", "n": 1}

    limits = httpx.Limits(max_connections=GATEWAYS * PER_GATEWAY)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers={"Authorization": f"Bearer {key}"}) as client:
        answers = await asyncio.gather(
            *(client.post(g.url + PATH, json=body) for g in gateways for _ in range(PER_GATEWAY))
        )

    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 3
    assert statuses.count(429) == GATEWAYS * PER_GATEWAY - 3
    refused = {answer.json()["error"]["code"] for answer in answers if answer.status_code == 429}
    assert refused == {"insufficient_quota"}
    assert len((services.tmp / "stub.seen.jsonl").read_text().splitlines()) == 3
