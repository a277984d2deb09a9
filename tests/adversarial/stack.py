"""The whole stack as processes: the real backend on the tiny diffusers model, and `quotagate serve` before it.

The free plan is the seed's: 3 images a day, and a few requests of one account at once. Its rate
limit is wide, so that the daily quota is what an adversarial client meets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.keys import new_key
from tests.support.processes import ServiceSet
from tests.support.quotas import plan, quota_file, quotas_yaml

DAILY_IMAGES = 3
QUOTAS = quotas_yaml(plan("free", daily=DAILY_IMAGES, rate=6000, burst=1000, concurrency=2))
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
        return new_key(self.redis_url, account, "free")


@contextmanager
def running_stack(redis_url: str, tmp: Path) -> Iterator[Stack]:
    """The backend and a gateway over `redis_url`, each ready; stopped at exit."""
    services = ServiceSet(tmp)
    try:
        quotas = quota_file(tmp, QUOTAS)
        env = {"QUOTAGATE_BODY_TIMEOUT": BODY_TIMEOUT}
        gateway, backend = services.stack(quotas, redis_url, *BACKEND_ARGS, env=env)
        yield Stack(gateway.url, backend.url, redis_url)
    finally:
        services.stop()
