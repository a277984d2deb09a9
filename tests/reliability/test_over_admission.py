"""Four gateway processes, 500 concurrent requests each, one free account: exactly 3 images admitted."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from tests.support.processes import ServiceSet
from tests.support.quotas import IMAGES as PATH

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

GATEWAYS = 4
PER_GATEWAY = 500


async def test_four_gateways_and_two_thousand_concurrent_requests_admit_exactly_the_daily_three(
    services: ServiceSet, quotas: Path, redis_url: str
) -> None:
    # A backend with room for all 2,000 at once: a request holds a place while it is decided, and what is
    # tested is that every one is decided and exactly 3 admitted, not that a burst waits its turn.
    stub = services.stub_upstream(capacity=GATEWAYS * PER_GATEWAY)
    # A generous Redis timeout: on two busy cores a 0.5 s one turns overload into 503s, which is not what is tested.
    patient = {"QUOTAGATE_REDIS_TIMEOUT": "10"}
    gateways = [services.gateway(f"gateway-{i}", quotas, redis_url, stub.url, patient) for i in range(GATEWAYS)]
    for service in [stub, *gateways]:
        service.wait_ready()
    key = await services.create_key(redis_url, "launch-day", "free")
    body = {"prompt": "a lighthouse", "n": 1}

    # aiohttp, not httpx, as the client: a quarter of the CPU per request, and the gateways share the two cores.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {key}"}) as session:

        async def send(url: str) -> tuple[int, str | None]:
            async with session.post(url + PATH, json=body) as answer:
                payload = await answer.json()
                return answer.status, payload.get("error", {}).get("code")

        answers = await asyncio.gather(*(send(g.url) for g in gateways for _ in range(PER_GATEWAY)))

    outcomes = Counter(answers)
    assert outcomes == {(200, None): 3, (429, "insufficient_quota"): GATEWAYS * PER_GATEWAY - 3}
    assert len((services.tmp / "stub.seen.jsonl").read_text().splitlines()) == 3
