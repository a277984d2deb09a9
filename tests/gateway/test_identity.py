"""API keys: stored as an HMAC only, cached per replica; revocations and plan changes reach every replica at once."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.admission.identity import Identity, KeyStore
from gateway.errors import Unauthorized
from limits.nearcache import INVALIDATIONS, follow_invalidations
from tests.support.keys import key_store

pytestmark = pytest.mark.anyio


async def test_the_secret_is_never_stored_in_plain_text(redis_client: Redis) -> None:
    key = await key_store(redis_client).create_key("ann", "free")
    _, key_id, secret = key.split("_")
    assert (await redis_client.hgetall(f"qg:key:{key_id}"))[b"account"] == b"ann"
    stored = [await redis_client.dump(name) for name in await redis_client.keys("*")]
    assert stored and not any(secret.encode() in value for value in stored)


async def test_a_key_authenticates_to_its_account_and_plan(redis_client: Redis) -> None:
    store = key_store(redis_client)
    key = await store.create_key("ann", "free")
    identity = await store.authenticate(key)
    assert (identity.account, identity.plan) == ("ann", "free")


async def test_a_key_checked_with_another_secret_fails(redis_client: Redis) -> None:
    key = await key_store(redis_client).create_key("ann", "free")
    with pytest.raises(Unauthorized):
        await KeyStore(redis_client, b"another-secret-16-bytes-long").authenticate(key)


async def test_without_invalidations_changes_show_after_the_ttl(redis_client: Redis) -> None:
    now = [1000.0]
    store = key_store(redis_client, cache_ttl=1.0, clock=lambda: now[0])
    key = await store.create_key("ann", "free")
    assert (await store.authenticate(key)).plan == "free"

    # Changed by a replica whose announcement this one cannot hear (no follower: Redis Cluster).
    await redis_client.hset("qg:account:ann", "plan", "pro")
    await redis_client.delete(f"qg:key:{key.split('_')[1]}")
    now[0] += 0.5
    assert (await store.authenticate(key)).plan == "free"  # served from the cache
    now[0] += 0.6
    with pytest.raises(Unauthorized):
        await store.authenticate(key)


async def test_accounts_are_checked(redis_client: Redis) -> None:
    with pytest.raises(ValueError, match="account 'a{b}'"):
        await key_store(redis_client).create_key("a{b}", "free")


async def test_keys_are_listed_by_account_and_revoked_by_id(redis_client: Redis) -> None:
    store = key_store(redis_client)
    first, second = await store.create_key("ann", "free"), await store.create_key("ann", "free")
    await store.create_key("bob", "free")
    listed = await store.list_keys("ann")
    assert sorted(i.key_id for i in listed) == sorted(k.split("_")[1] for k in (first, second))
    assert all(i.account == "ann" and i.created > 0 for i in listed)

    assert await store.revoke(first.split("_")[1]) == "ann"
    with pytest.raises(Unauthorized):
        await store.authenticate(first)
    assert (await store.authenticate(second)).account == "ann"
    assert [i.key_id for i in await store.list_keys("ann")] == [second.split("_")[1]]
    with pytest.raises(ValueError, match="no key"):
        await store.revoke(first.split("_")[1])
    with pytest.raises(ValueError, match="16 hex digits"):
        await store.revoke("nonsense")


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[list[KeyStore]]:
    """Two replicas' key stores, each on its own connection, following invalidations, with a TTL of an hour."""
    clients = [Redis.from_url(redis_url) for _ in range(2)]
    stores = [key_store(c, cache_ttl=3600) for c in clients]
    stop = asyncio.Event()
    followers = [asyncio.create_task(follow_invalidations(c, stop, [s])) for c, s in zip(clients, stores, strict=True)]

    async def both_subscribed() -> bool:
        return bool((await clients[0].pubsub_numsub(INVALIDATIONS))[0][1] == 2)

    await _until(both_subscribed)
    yield stores
    stop.set()
    await asyncio.wait(followers)
    for c in clients:
        await c.aclose()


async def _until(check, limit: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until `check()` holds; fail after `limit` s (a bound on a hang, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + limit
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "the change never reached the other replica"
        await asyncio.sleep(0.005)


async def test_a_revocation_on_one_replica_reaches_the_others_cache_at_once(replicas: list[KeyStore]) -> None:
    one, other = replicas
    key = await one.create_key("ann", "free")
    assert (await other.authenticate(key)).account == "ann"  # cached for an hour: only an invalidation clears it

    await one.revoke(key.split("_")[1])

    async def refused() -> bool:
        try:
            await other.authenticate(key)
        except Unauthorized:
            return True
        return False

    await _until(refused)


async def test_a_plan_change_on_one_replica_reaches_the_others_cache_at_once(replicas: list[KeyStore]) -> None:
    one, other = replicas
    key = await one.create_key("ann", "free")
    assert (await other.authenticate(key)).plan == "free"
    await one.set_plan("ann", "pro")

    async def moved() -> bool:
        return (await other.authenticate(key)).plan == "pro"

    await _until(moved)


async def test_an_answer_read_before_an_invalidation_is_not_cached(redis_client: Redis) -> None:
    store = key_store(redis_client, cache_ttl=3600)
    key = await store.create_key("ann", "free")
    lookup = asyncio.create_task(store.authenticate(key))
    await asyncio.sleep(0)  # the lookup is now waiting on Redis
    store.forget("ann")  # announced while the lookup was in flight
    assert (await lookup).plan == "free"
    await redis_client.hset("qg:account:ann", "plan", "pro")
    assert (await store.authenticate(key)).plan == "pro"


async def test_a_vouched_account_needs_a_plan(redis_client: Redis) -> None:
    store = key_store(redis_client)
    await store.set_plan("sso-user", "pro")
    assert await store.vouched("sso-user") == Identity(account="sso-user", plan="pro", key_id=None)
    with pytest.raises(Unauthorized):
        await store.vouched("stranger")
    with pytest.raises(Unauthorized):
        await store.vouched("bad account")


async def test_cached_identities_stay_out_of_the_garbage_collectors_scans(redis_client: Redis) -> None:
    store = key_store(redis_client, cache_ttl=3600)
    key = await store.create_key("ann", "free")
    accounts = [f"acct-{i}" for i in range(1000)]
    for start in range(0, len(accounts), 50):
        await asyncio.gather(*(store.set_plan(account, "free") for account in accounts[start : start + 50]))
    for _ in range(3):
        gc.collect()
    tracked_before = len(gc.get_objects())
    for account in accounts:
        await store.vouched(account)
    await store.authenticate(key)
    for _ in range(3):  # a tuple of strings stops being tracked once its items have, a level a collection
        gc.collect()
    # Cached as Identity objects (a tuple subclass, never untracked), 1,000 accounts were 3,000
    # objects that every full collection scanned.
    assert len(gc.get_objects()) - tracked_before < 100
    assert await store.vouched("acct-999") == Identity("acct-999", "free", None)
    assert (await store.authenticate(key)).account == "ann"
