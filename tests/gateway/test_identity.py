"""API keys: stored as an HMAC only, cached per replica, revocation seen once the cache entry ages out."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from gateway.errors import Unauthorized
from gateway.identity import KeyStore

from .conftest import SECRET

pytestmark = pytest.mark.anyio


async def test_the_secret_is_never_stored_in_plain_text(redis_client: Redis) -> None:
    key = await KeyStore(redis_client, SECRET).create_key("ann", "free")
    _, key_id, secret = key.split("_")
    assert (await redis_client.hgetall(f"qg:key:{key_id}"))[b"account"] == b"ann"
    stored = [v for name in await redis_client.keys("*") for v in (await redis_client.hgetall(name)).values()]
    assert stored and not any(secret.encode() in value for value in stored)


async def test_a_key_authenticates_to_its_account_and_plan(redis_client: Redis) -> None:
    store = KeyStore(redis_client, SECRET)
    key = await store.create_key("ann", "free")
    identity = await store.authenticate(key)
    assert (identity.account, identity.plan) == ("ann", "free")


async def test_a_key_checked_with_another_secret_fails(redis_client: Redis) -> None:
    key = await KeyStore(redis_client, SECRET).create_key("ann", "free")
    with pytest.raises(Unauthorized):
        await KeyStore(redis_client, b"another-secret-16-bytes-long").authenticate(key)


async def test_cached_lookups_cost_no_redis_call_and_changes_show_after_the_ttl(redis_client: Redis) -> None:
    now = [1000.0]
    store = KeyStore(redis_client, SECRET, cache_ttl=1.0, clock=lambda: now[0])
    key = await store.create_key("ann", "free")
    assert (await store.authenticate(key)).plan == "free"

    await store.set_plan("ann", "pro")
    await redis_client.delete(f"qg:key:{key.split('_')[1]}")  # revoked meanwhile
    now[0] += 0.5
    assert (await store.authenticate(key)).plan == "free"  # served from the cache
    now[0] += 0.6
    with pytest.raises(Unauthorized):
        await store.authenticate(key)


async def test_accounts_are_checked(redis_client: Redis) -> None:
    with pytest.raises(ValueError, match="account 'a{b}'"):
        await KeyStore(redis_client, SECRET).create_key("a{b}", "free")
