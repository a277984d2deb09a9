"""Forward an admitted request to the least busy healthy upstream of its pool, over one aiohttp session.

The answer's body is not read here: gateway/relay.py reads it whole or streams it on to the client. An
upstream that fails (no connection, a timeout, a 5xx other than its 503 "overloaded", a body cut
short) `eject_after` times in a row is set aside for `eject_for` seconds (passive health); if every
upstream of a pool is set aside, they are all tried again rather than none.

aiohttp, not httpx: measured here, an httpx.AsyncClient proxy served 0.03× the requests per
second of a bare Starlette app and an aiohttp one 0.31× (httpx's pool costs ~1 ms CPU a request).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from gateway.config import PoolPolicy
from gateway.errors import BadGateway

# Hop-by-hop fields (RFC 9110 §7.6.1) and those aiohttp sets itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_HOP_BY_HOP_RAW = frozenset(name.encode("latin-1") for name in _HOP_BY_HOP)
# Set by the gateway alone: a client that sends one has it dropped.
INTERNAL_PREFIX = "x-quotagate-"
# An upstream's 503 says "busy", not "broken": it is passed on, not held against the upstream.
_OVERLOADED = 503


# An idle upstream connection is dropped after this long: under the 5 s after which uvicorn (the
# backend's server) closes one, so no request is sent on a connection at the moment the upstream closes
# it. aiohttp's default of 15 s leaves that race open: bench/surge.py's load generator, an aiohttp
# client too, lost 0-3 requests a run to it against the gateway's own uvicorn.
UPSTREAM_KEEPALIVE_S = 4.0
# aiohttp adds these unless told not to; a proxy sends the client's own or none. Its Accept-Encoding
# would ask the upstream to compress for a client that never said it can read gzip.
_NOT_ADDED = ("Accept", "Accept-Encoding", "User-Agent")


def upstream_session(*, connect_timeout: float, read_timeout: float) -> aiohttp.ClientSession:
    """The HTTP client every request is forwarded over: pooled keep-alive connections, no limit of its own."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout),
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
        auto_decompress=False,  # bodies are relayed as they came
        cookie_jar=aiohttp.DummyCookieJar(),  # shared by every user: it must keep no upstream's cookies
        skip_auto_headers=_NOT_ADDED,
    )


def upstream_headers(
    client_headers: Mapping[str, str], extra: Mapping[str, str], *, drop: tuple[str, ...] = ()
) -> CIMultiDict[str]:
    """The client's headers less hop-by-hop, credentials, internal ones and `drop`, plus the gateway's own."""
    dropped = _dropped(drop)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client_headers.items():
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower in dropped or lower.startswith(INTERNAL_PREFIX):
            continue
        out.add(name, value)
    out.update(extra)
    return out


@functools.lru_cache(maxsize=8)
def _dropped(drop: tuple[str, ...]) -> frozenset[str]:
    """The lower-case names never forwarded besides hop-by-hop ones: worked out once, not per request."""
    return frozenset(name.lower() for name in drop) | {"authorization"}


def client_headers(upstream: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's answer headers, as raw ASGI pairs with lower-case names, less hop-by-hop ones."""
    named = ((name.lower(), value) for name, value in upstream)
    return [(name, value) for name, value in named if name not in _HOP_BY_HOP_RAW]


@dataclass(slots=True)
class Upstream:
    """One URL of a pool, and what this process knows of it."""

    url: str
    in_flight: int = 0
    failures: int = 0  # in a row
    out_until: float = 0.0  # set aside until then (the forwarder's clock)


class UpstreamAnswer:
    """An upstream's status and headers; its body is still to come. Always end with `finish`."""

    def __init__(self, forwarder: Forwarder, upstream: Upstream, policy: PoolPolicy, response: aiohttp.ClientResponse):
        self.status = response.status
        self.raw_headers = client_headers(response.raw_headers)
        self.content_length = response.content_length  # None: chunked, or read to the connection's end
        self.upstream = upstream
        self._forwarder = forwarder
        self._policy = policy
        self._response = response
        self._finished = False

    async def read(self) -> bytes:
        """The whole body; BadGateway if the upstream cuts it short or stalls past the read timeout."""
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise BadGateway(f"The image service broke off its answer ({type(exc).__name__}).") from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; BadGateway if the upstream cuts it short or stalls past the read timeout."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise BadGateway(f"The image service broke off its answer ({type(exc).__name__}).") from exc

    def finish(self, *, upstream_failed: bool = False) -> None:
        """Give the connection back (or drop it, if the body was not read to its end) and count the outcome."""
        if self._finished:
            return
        self._finished = True
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()
        failed = upstream_failed or (self.status >= 500 and self.status != _OVERLOADED)
        self._forwarder.settle(self.upstream, self._policy, failed=failed)


class Forwarder:
    """Sends requests to upstream pools, each to the healthy URL with the fewest requests in flight."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        pools: Mapping[str, tuple[str, ...]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._pools = {name: [Upstream(url) for url in urls] for name, urls in pools.items()}
        self._clock = clock

    def healthy(self, pool: str) -> int:
        """How many upstreams of `pool` are not set aside now."""
        now = self._clock()
        return sum(1 for u in self._pools[pool] if u.out_until <= now)

    def pick(self, pool: str) -> Upstream:
        """The upstream the next request of `pool` goes to."""
        upstreams = self._pools[pool]
        now = self._clock()
        candidates = [u for u in upstreams if u.out_until <= now] or upstreams
        return min(candidates, key=lambda u: u.in_flight)

    async def open(
        self, pool: str, policy: PoolPolicy, method: str, path_qs: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamAnswer:
        """The upstream's status and headers; BadGateway if none came (refused, reset or timed out)."""
        upstream = self.pick(pool)
        upstream.in_flight += 1
        try:
            response = await self._session.request(method, upstream.url + path_qs, headers=headers, data=body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.settle(upstream, policy, failed=True)
            raise BadGateway(f"The image service did not answer ({type(exc).__name__}); you were not charged.") from exc
        except BaseException:  # cancelled: the client went away first
            self.settle(upstream, policy, failed=False)
            raise
        return UpstreamAnswer(self, upstream, policy, response)

    def settle(self, upstream: Upstream, policy: PoolPolicy, *, failed: bool) -> None:
        """A request to `upstream` ended; set it aside after `eject_after` failures in a row."""
        upstream.in_flight -= 1
        if not failed:
            upstream.failures = 0
            return
        upstream.failures += 1
        if upstream.failures >= policy.eject_after:
            upstream.failures = 0
            upstream.out_until = self._clock() + policy.eject_for
