"""Connect to Redis from a URL: redis://, rediss://, unix://, or redis+cluster:// / rediss+cluster://."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster

RedisClient = Redis | RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def connect(url: str, *, timeout: float = 0.5, max_connections: int = 64) -> RedisClient:
    """A client for `url`, with tight timeouts so no request waits long on a dead Redis.

    A cluster URL names any one node (`redis+cluster://10.0.0.1:6379`); the client finds the rest.
    """
    scheme, sep, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        return RedisCluster.from_url(
            f"{CLUSTER_SCHEMES[scheme]}{sep}{rest}", socket_timeout=timeout, socket_connect_timeout=timeout
        )
    # A blocking pool: past `max_connections` a call waits up to `timeout` for a free connection
    # instead of failing at once; coalescing keeps the number in use small.
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    return Redis.from_pool(pool)  # the client owns the pool and closes it with itself
