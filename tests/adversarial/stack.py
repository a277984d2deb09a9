"""The whole stack as processes: the real backend on the tiny diffusers model, and `quotagate serve` before it.

The free plan is the seed's: 3 images a day, and a few requests of one account at once. Its rate
limit is wide, so that the daily quota is what an adversarial client meets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.admission.identity import KeyStore
from limits import connect
from tests.reliability.processes import SECRET, ServiceSet

DAILY_IMAGES = 3
QUOTAS = f"""\
timezone: UTC
plans:
  free:
    priority: 0
    daily_images: {DAILY_IMAGES}
    rate: {{images: 6000, per: minute, burst: 1000}}
    concurrency: 2
routes:
  - path: /v1/images/generations
    upstream: diffusion
    cost: images
"""
# One small size, two steps: an image in ~50 ms, so that a run holds many requests.
BACKEND_ARGS = ("--sizes", "64x64", "--default-size", "64x64", "--max-n", "2", "--default-steps", "2")
# Seconds a request body may take: short, so that a stalled body is answered 408 soon.
BODY_TIMEOUT = "0.5"


@dataclass(frozen=True)
class Stack:
    gateway_url: str
    backend_url: str
    redis_url: str

    def new_key(self, account: str) -> str:
        """A fresh API key of `account` on the free plan."""

        async def create() -> str:
            redis = connect(self.redis_url)
            try:
                return await KeyStore(redis, SECRET.encode()).create_key(account, "free")
            finally:
                await redis.aclose()

        return asyncio.run(create())


@contextmanager
def running_stack(redis_url: str, tmp: Path) -> Iterator[Stack]:
    """The backend and a gateway over `redis_url`, each ready; stopped at exit."""
    services = ServiceSet(tmp)
    try:
        quotas = tmp / "quotas.yaml"
        quotas.write_text(QUOTAS)
        backend = services.backend(Path("tiny"), "--data-dir", str(tmp / "backend"), *BACKEND_ARGS)
        gateway = services.gateway("gateway", quotas, redis_url, backend.url, {"QUOTAGATE_BODY_TIMEOUT": BODY_TIMEOUT})
        gateway.wait_ready()
        backend.wait_ready("/readyz", timeout=120)
        yield Stack(gateway.url, backend.url, redis_url)
    finally:
        services.stop()
