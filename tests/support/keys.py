"""The key secret every test gateway runs with, and API keys made in its key store."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from gateway.admission.identity import KeyStore
from limits import connect

SECRET = b"test-secret-of-at-least-16-bytes"


def key_store(redis: Redis, **options: Any) -> KeyStore:
    """The key store the test gateways read, on `redis` (`options` as KeyStore takes them)."""
    return KeyStore(redis, SECRET, **options)


async def create_key(redis_url: str, account: str, plan: str) -> str:
    """A fresh API key of `account` on `plan`, made over a connection of its own."""
    redis = connect(redis_url)
    try:
        return await key_store(redis).create_key(account, plan)
    finally:
        await redis.aclose()


def new_key(redis_url: str, account: str, plan: str) -> str:
    """`create_key` for tests that do not run an event loop."""
    return asyncio.run(create_key(redis_url, account, plan))
