"""The engine, unchanged, on a real three-master Redis Cluster: same decisions, one slot per account."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis

from limits import Bucket, DailyQuota, Engine, LimitSet, RedisClient, connect
from limits.keys import counter_key, idempotency_record
from tests.limits.cluster import LocalCluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

UTC = ZoneInfo("UTC")
NOON = datetime(2026, 11, 21, 12, 0, tzinfo=UTC).timestamp()
FREE = LimitSet(
    buckets=(Bucket("free-rate", "rate", rate=6, period=60, burst=3),),
    quotas=(DailyQuota("free-daily", "daily", limit=3, timezone=UTC),),
)
ACCOUNTS = [f"acct-{i}" for i in range(24)]


@pytest.fixture
async def cluster_client(cluster_url: str) -> AsyncIterator[RedisClient]:
    client = connect(cluster_url)
    yield client
    await client.aclose()


@pytest.fixture
async def masters(redis_cluster: LocalCluster) -> AsyncIterator[list[Redis]]:
    """A plain client per master, to see where keys live."""
    clients = [Redis(host="127.0.0.1", port=port, decode_responses=True) for port in redis_cluster.ports]
    yield clients
    for client in clients:
        await client.aclose()


async def test_cluster_has_three_masters_sharing_every_slot(masters: list[Redis]) -> None:
    info = await masters[0].cluster("INFO")
    assert (info["cluster_state"], info["cluster_size"], info["cluster_slots_ok"]) == ("ok", "3", "16384")


async def test_engine_runs_unchanged_on_a_cluster(cluster_client: RedisClient) -> None:
    engine = Engine(cluster_client)
    outcomes = [await engine.decide("alice", FREE, 1, now=NOON + 10 * i) for i in range(4)]

    assert [d.allowed for d in outcomes] == [True, True, True, False]
    assert [d.states[1].remaining for d in outcomes] == [2, 1, 0, 0]
    assert outcomes[3].denied_by is not None and outcomes[3].denied_by.limit.name == "free-daily"
    await engine.refund("alice", FREE, outcomes[2], now=NOON + 40)
    assert (await engine.decide("alice", FREE, 1, now=NOON + 40)).allowed
    assert await cluster_client.hget(counter_key("alice", "daily"), "u") == b"3"


async def test_engine_uses_the_cluster_nodes_clock_when_no_time_is_given(
    cluster_client: RedisClient, masters: list[Redis]
) -> None:
    seconds, micros = await masters[0].time()
    decision = await Engine(cluster_client).decide("bea", FREE, 1)
    assert decision.allowed and decision.states[1].remaining == 2
    assert abs(decision.now_us - (seconds * 1_000_000 + micros)) < 5_000_000


async def test_accounts_spread_over_slots_and_masters_yet_each_accounts_keys_share_one_slot(
    cluster_client: RedisClient, masters: list[Redis]
) -> None:
    engine = Engine(cluster_client)
    for account in ACCOUNTS:
        assert (await engine.decide(account, FREE, 1, now=NOON, idempotency_key=f"req-{account}")).allowed

    slots = {}
    for account in ACCOUNTS:
        keys = [counter_key(account, limit.counter) for limit in FREE] + [idempotency_record(account, f"req-{account}")]
        account_slots = {await masters[0].cluster("KEYSLOT", key) for key in keys}
        assert len(account_slots) == 1, f"{account}'s keys span slots {account_slots}"
        slots[account] = account_slots.pop()
    assert len(set(slots.values())) > len(ACCOUNTS) // 2  # accounts are spread, not piled on one slot

    holders: dict[str, set[int]] = {}
    for node, client in enumerate(masters):
        for key in await client.keys("qg:*"):
            holders.setdefault(str(key).split("}")[0] + "}", set()).add(node)
    assert len(holders) == len(ACCOUNTS)
    assert all(len(nodes) == 1 for nodes in holders.values())  # every key of an account, the idempotency
    assert set().union(*holders.values()) == {0, 1, 2}  # record included, on one master; all masters used
