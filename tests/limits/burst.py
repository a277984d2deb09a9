"""Many concurrent decisions for one account: from one event loop, or from another process.

Run as `python -m tests.limits.burst URL ACCOUNT DECISIONS CLIENTS`: the process connects, prints
`ready`, waits for a line on stdin (so several processes start their burst together, with no
sleeps), fires, and prints how many decisions were admitted.
"""

from __future__ import annotations

import asyncio
import sys
from zoneinfo import ZoneInfo

from limits import Bucket, DailyQuota, Decision, Engine, LimitSet, RedisClient, connect

DAILY = 3

# The free plan's day of 3 images, behind a bucket too deep to refuse any of a thousand requests:
# only the daily quota decides, so over-admission would show as a fourth image.
FREE = LimitSet(
    buckets=(Bucket("free-rate", "rate", rate=1000, period=1, burst=10_000),),
    quotas=(DailyQuota("free-daily", "daily", limit=DAILY, timezone=ZoneInfo("UTC")),),
)


# redis-py opens a connection per command in flight, at most 100 per client, and refuses the 101st
# (MaxConnectionsError); a thousand cold connections at once on two cores take longer than the
# gateway's 0.5 s connect timeout. Callers keep each client under 100 in flight, and this is patient:
# what is tested here is how many are admitted, not how fast.
MAX_IN_FLIGHT_PER_CLIENT = 100
TIMEOUT = 10.0


async def burst(url: str, account: str, decisions: int, clients: int) -> list[Decision]:
    """Fire `decisions` concurrent decisions (cost 1, server time) spread over `clients` clients."""
    if decisions > clients * MAX_IN_FLIGHT_PER_CLIENT:
        raise ValueError(f"{decisions} decisions need at least {decisions // MAX_IN_FLIGHT_PER_CLIENT} clients")
    redis_clients: list[RedisClient] = [connect(url, timeout=TIMEOUT) for _ in range(clients)]
    try:
        # A cold redis-py RedisCluster that meets its first commands concurrently may swap the node
        # objects under them (seen: AttributeError on a connection's writer); start-up does this once.
        for client in redis_clients:
            await client.initialize()
        engines = [Engine(client) for client in redis_clients]
        outcomes = await asyncio.gather(*(engines[i % clients].decide(account, FREE, 1) for i in range(decisions)))
        for engine in engines:
            await engine.aclose()
    finally:
        for client in redis_clients:
            await client.aclose()
    return outcomes


def main(argv: list[str]) -> None:
    url, account, decisions, clients = argv[0], argv[1], int(argv[2]), int(argv[3])
    print("ready", flush=True)
    sys.stdin.readline()
    admitted = sum(d.allowed for d in asyncio.run(burst(url, account, decisions, clients)))
    print(admitted, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
