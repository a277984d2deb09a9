"""Connect to Redis from a URL: redis://, rediss:// and unix:// (a single server)."""

from __future__ import annotations

from redis.asyncio import Redis


def connect(url: str, *, timeout: float = 0.5) -> Redis:
    """A client for the Redis at `url`, with tight timeouts so no request waits long on a dead Redis."""
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=0,
    )
