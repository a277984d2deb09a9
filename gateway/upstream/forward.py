"""Forward an admitted request to the least busy healthy upstream of its pool, over one UpstreamClient.

The answer's body is not read here: gateway/http/relay.py reads it whole or streams it on to the client. An
upstream that fails (no connection, a timeout, a 5xx other than its 503 "overloaded", a body cut
short) `eject_after` times in a row is set aside for `eject_for` seconds (passive health); if every
upstream of a pool is set aside, they are all tried again rather than none.

The client is the gateway's own (gateway/upstream/client.py), not httpx nor aiohttp: measured here,
an httpx.AsyncClient proxy served 0.03× the requests per second of a bare Starlette app (its pool
costs ~1 ms CPU a request), and aiohttp's client cost ~100-140 µs CPU a request more than ours.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gateway.config.addresses import Origin
from gateway.config.quotas import PoolPolicy
from gateway.errors import BadGateway
from gateway.upstream.client import Answer, UpstreamClient, UpstreamError

# Hop-by-hop fields (RFC 9110 §7.6.1), those the client sets itself, and Expect: the gateway has the
# whole body already, so the upstream is never asked to wait before it.
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
        "expect",
    }
)
_HOP_BY_HOP_RAW = frozenset(name.encode("latin-1") for name in _HOP_BY_HOP)
# Set by the gateway alone: a client that sends one has it dropped.
INTERNAL_PREFIX = "x-quotagate-"
# An upstream's 503 says "busy", not "broken": it is passed on, not held against the upstream.
_OVERLOADED = 503
# The backend's header on the answer to a request withdrawn before it began (backend/errors.py).
_WITHDRAWN = (b"x-quotagate-withdrawn", b"1")

log = logging.getLogger("quotagate.forward")


def upstream_headers(
    client_headers: Mapping[str, str], extra: Mapping[str, str], *, drop: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """The client's headers less hop-by-hop, credentials, internal ones, `drop` and those in `extra`; then `extra`.

    `client_headers` has lower-case names. Hop-by-hop also are the fields the client's `Connection` names
    (RFC 9110 §7.6.1): meant for the gateway alone, never for the upstream.
    """
    dropped = _dropped(drop, tuple(extra))
    connection = client_headers.get("connection")
    if connection is not None:
        dropped = dropped | _connection_options(connection)
    kept = [
        (name, value)
        for name, value in client_headers.items()
        if (lower := name.lower()) not in dropped and not lower.startswith(INTERNAL_PREFIX)
    ]
    return kept + list(extra.items())


@functools.lru_cache(maxsize=8)
def _dropped(drop: tuple[str, ...], replaced: tuple[str, ...]) -> frozenset[str]:
    """The lower-case names never forwarded from the client: worked out once, not per request."""
    return frozenset(name.lower() for name in drop + replaced) | {"authorization"} | _HOP_BY_HOP


@functools.lru_cache(maxsize=64)
def _connection_options(connection: str) -> frozenset[str]:
    """The lower-case field names a `Connection` value lists (`keep-alive`, `close` and the rest alike)."""
    return frozenset(option.strip().lower() for option in connection.split(","))


def client_headers(upstream: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's answer headers, as raw ASGI pairs with lower-case names, less hop-by-hop ones."""
    named = ((name.lower(), value) for name, value in upstream)
    return [(name, value) for name, value in named if name not in _HOP_BY_HOP_RAW]


@dataclass(slots=True)
class Upstream:
    """One URL of a pool, and what this process knows of it."""

    url: str
    origin: Origin = field(init=False)
    in_flight: int = 0
    failures: int = 0  # in a row
    out_until: float = 0.0  # set aside until then (the forwarder's clock)

    def __post_init__(self) -> None:
        self.origin = Origin.parse(self.url)


class UpstreamAnswer:
    """An upstream's status and headers; its body is still to come. Always end with `finish`."""

    def __init__(self, forwarder: Forwarder, upstream: Upstream, policy: PoolPolicy, answer: Answer):
        self.status = answer.status
        self.raw_headers = client_headers(answer.headers)
        self.content_length = answer.content_length  # None: chunked, or read to the connection's end
        self.upstream = upstream
        self._forwarder = forwarder
        self._policy = policy
        self._answer = answer
        self._finished = False

    @property
    def withdrawn(self) -> bool:
        """The backend answered that it withdrew the request before beginning it: no image was made."""
        return _WITHDRAWN in self.raw_headers

    async def read(self) -> bytes:
        """The whole body; BadGateway if the upstream cuts it short or stalls past the read timeout."""
        try:
            return await self._answer.read()
        except UpstreamError as exc:
            raise BadGateway(f"The image service broke off its answer ({exc}).") from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; BadGateway if the upstream cuts it short or stalls past the read timeout."""
        try:
            async for chunk in self._answer.chunks():
                yield chunk
        except UpstreamError as exc:
            raise BadGateway(f"The image service broke off its answer ({exc}).") from exc

    def finish(self, *, upstream_failed: bool = False) -> None:
        """Give the connection back (or drop it, if the body was not read to its end) and count the outcome."""
        if self._finished:
            return
        self._finished = True
        self._answer.release()
        failed = upstream_failed or (self.status >= 500 and self.status != _OVERLOADED)
        self._forwarder.settle(self.upstream, self._policy, failed=failed)


class Forwarder:
    """Sends requests to upstream pools, each to the healthy URL with the fewest requests in flight."""

    def __init__(
        self,
        client: UpstreamClient,
        pools: Mapping[str, tuple[str, ...]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._pools = {name: [Upstream(url) for url in urls] for name, urls in pools.items()}
        self._clock = clock
        self._withdrawals: set[asyncio.Task[None]] = set()

    def healthy(self, pool: str) -> int:
        """How many upstreams of `pool` are not set aside now."""
        now = self._clock()
        return sum(1 for u in self._pools[pool] if u.out_until <= now)

    def is_set_aside(self, pool: str, url: str) -> bool:
        """Whether the upstream `url` of `pool` is set aside now; KeyError if the pool has no such URL."""
        for upstream in self._pools[pool]:
            if upstream.url == url:
                return upstream.out_until > self._clock()
        raise KeyError(f"{url!r} is not an upstream of pool {pool!r}")

    def upstream(self, pool: str, url: str | None) -> Upstream:
        """The upstream of `pool` at `url`, where the fleet placed the request; `pick`'s choice if it is not
        one of the pool's or is set aside now (the fleet forgets it at the next capacity poll)."""
        now = self._clock()
        for upstream in self._pools[pool]:
            if upstream.url == url and upstream.out_until <= now:
                return upstream
        return self.pick(pool)

    def pick(self, pool: str) -> Upstream:
        """The upstream the next request of `pool` goes to."""
        upstreams = self._pools[pool]
        now = self._clock()
        candidates = [u for u in upstreams if u.out_until <= now] or upstreams
        return min(candidates, key=lambda u: u.in_flight)

    async def open(
        self,
        pool: str,
        policy: PoolPolicy,
        method: str,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        upstream: Upstream | None = None,
    ) -> UpstreamAnswer:
        """The upstream's status and headers (from `upstream`, else the one `pick` names); BadGateway if none came."""
        if upstream is None:
            upstream = self.pick(pool)
        upstream.in_flight += 1
        try:
            answer = await self._client.send(upstream.origin, method, path_qs, headers, body)
        except UpstreamError as exc:
            self.settle(upstream, policy, failed=True)
            raise BadGateway(f"The image service did not answer ({exc}); you were not charged.") from exc
        except BaseException:  # cancelled: the client went away first
            self.settle(upstream, policy, failed=False)
            raise
        return UpstreamAnswer(self, upstream, policy, answer)

    def withdraw(self, upstream: Upstream, job: str) -> None:
        """Ask `upstream`, in the background, to drop the queued request tagged `job` (DELETE /v1/jobs/{job}).

        Its answer is not needed: the request's own answer says whether it was withdrawn or had begun.
        """
        task = asyncio.get_running_loop().create_task(self._withdraw(upstream, job))
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

    async def _withdraw(self, upstream: Upstream, job: str) -> None:
        try:
            answer = await self._client.send(upstream.origin, "DELETE", f"/v1/jobs/{job}", (), b"")
            try:
                await answer.read()
            finally:
                answer.release()
        except UpstreamError as exc:  # the request then runs on, and is charged as any begun one
            log.warning("withdrawal from %s failed: %s", upstream.url, exc)

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
