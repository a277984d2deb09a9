"""A thousand concurrent decisions for one free account admit exactly its daily 3, never a 4th.

Run against a single redis-server and a three-master Redis Cluster, from several connections in one
event loop and from several OS processes started together.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from limits import connect
from limits.keys import counter_key
from tests.limits.burst import DAILY, burst

pytestmark = pytest.mark.slow

DECISIONS = 1000
PROCESSES = 4


@pytest.fixture(params=["redis", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    """An empty Redis: one server, or a cluster."""
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url"))


async def used_today(url: str, account: str) -> int:
    client = connect(url)
    try:
        raw = await client.hget(counter_key(account, "daily"), "u")
    finally:
        await client.aclose()
    assert raw is not None, "no daily counter was written"
    return int(raw)


@pytest.mark.anyio
async def test_concurrent_decisions_over_several_connections_admit_exactly_the_quota(url: str) -> None:
    decisions = await burst(url, "free-1", DECISIONS, clients=16)

    assert len(decisions) == DECISIONS
    assert sum(d.allowed for d in decisions) == DAILY
    refusers = {d.denied_by.limit.name for d in decisions if d.denied_by is not None}
    assert refusers == {"free-daily"}  # the bucket never interfered: only the day refused
    assert await used_today(url, "free-1") == DAILY


@pytest.mark.anyio
async def test_concurrent_decisions_from_several_processes_admit_exactly_the_quota(url: str, repo_root: Path) -> None:
    each = str(DECISIONS // PROCESSES)
    async with asyncio.timeout(60):
        workers = [
            await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "tests.limits.burst", url, "free-2", each, "4"),
                cwd=repo_root,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(PROCESSES)
        ]
        # Every process has imported everything and waits; then all fire at once.
        for worker in workers:
            assert worker.stdout is not None
            assert await worker.stdout.readline() == b"ready\n"
        replies = await asyncio.gather(*(worker.communicate(b"go\n") for worker in workers))

    assert [worker.returncode for worker in workers] == [0] * PROCESSES
    assert sum(int(stdout) for stdout, _ in replies) == DAILY
    assert await used_today(url, "free-2") == DAILY
