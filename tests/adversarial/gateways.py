"""A real `quotagate serve` process in front of a stub image service, and keys for it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from redis.asyncio import Redis

from gateway.admission.identity import KeyStore
from tests.gateway.conftest import QUOTAS, SECRET, StubUpstream, serve_in_thread
from tests.gateway.serve import GatewayProcess, gateway_processes

IMAGES = "/v1/images/generations"


@contextmanager
def served(
    redis_url: str, tmp_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[GatewayProcess, StubUpstream]]:
    """One gateway process (the `free` and `pro` plans of tests/gateway) with `env` set, and the stub it forwards to."""
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text(QUOTAS)
    stub = StubUpstream()
    with (
        serve_in_thread(stub.app()) as stub.url,
        gateway_processes(1, quotas, redis_url, stub.url, tmp_path, **(env or {})) as (gateway,),
    ):
        yield gateway, stub


def new_key(redis_url: str, account: str, plan: str) -> str:
    """A fresh API key of `account` on `plan`."""

    async def create() -> str:
        redis = Redis.from_url(redis_url)
        try:
            return await KeyStore(redis, SECRET).create_key(account, plan)
        finally:
            await redis.aclose()

    return asyncio.run(create())
