"""The HTTP/1.1 client the gateway forwards over: keep-alive connections per upstream, parsed by httptools.

A proxy needs little of a general client: no cookies, redirects, decompression, proxies or retries;
one request at a time per connection, the answer's head, then its body read whole or as it comes.
This is that much and no more, on an asyncio protocol, with httptools (llhttp, the parser uvicorn
and Node.js use) reading the answers. Measured here (bench/overhead.py, its two passthrough proxies),
aiohttp's client cost ~100-140 µs of CPU per forwarded request more than this one.

An idle connection is closed after `keepalive` seconds, under the 5 s after which uvicorn (the
backend's server) closes one, so no request goes out on a connection the upstream is closing. The
read timeout bounds the silence between two reads, as aiohttp's `sock_read` did: an image that takes
a minute to make is fine, a stalled upstream is not.

Each request gets exactly one answer: the parser stops at the answer's end, and a connection on which
anything but blank lines follows that end is closed, never pooled, so nothing an upstream sends past
one answer can reach another. An answer's head is bounded, interim (1xx) answers are counted, and a
101 Switching Protocols is an error: the gateway relays HTTP and nothing else.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import NoReturn, cast

import httptools

from gateway.config.addresses import Origin

# Under the 5 s keep-alive of uvicorn, the backend's server.
UPSTREAM_KEEPALIVE_S = 4.0
# Past this many unread body bytes the connection stops reading until the relay catches up.
HIGH_WATER = 1 << 20
# Methods whose request is sent with a Content-Length even when empty (RFC 9110 §8.6).
_WITH_CONTENT = frozenset({"POST", "PUT", "PATCH"})
# The most an answer's head (or an interim answer's) may take, and the most read while heads are unfinished.
# The backend's heads are a few hundred bytes; 64 KiB is 4× the 16 KiB Node.js allows by default, room for
# any server or proxy in between, and a bound on what an upstream makes the gateway hold before a body.
MAX_HEAD_BYTES = 64 * 1024
# 100 Continue and a 103 Early Hints or two are all an exchange has reason to carry. Each interim answer
# is a read, so resets the read timeout: without a count, a stream of them would hold a request forever.
MAX_INTERIM = 8
_HEAD_TOO_LARGE = f"the answer's head is larger than {MAX_HEAD_BYTES // 1024} KiB"


class UpstreamError(Exception):
    """No complete answer: refused, reset, timed out, or not HTTP."""


class _Stop(Exception):
    """Raised in a parser callback to stop the parser where it is: the callback has settled the exchange."""


class Answer:
    """An upstream's status and headers; its body is still to come. Always end with `release`."""

    __slots__ = ("status", "headers", "content_length", "_connection", "_client", "_ended")

    def __init__(self, client: UpstreamClient, connection: _Connection) -> None:
        self.status = connection.status
        self.headers = connection.headers  # as received: (name, value) bytes
        self.content_length = connection.content_length  # None: chunked, or read to the connection's end
        self._connection = connection
        self._client = client
        self._ended = False

    @property
    def complete(self) -> bool:
        """The whole body has arrived."""
        return self._connection.complete

    async def read(self) -> bytes:
        """The whole body; UpstreamError if the upstream cuts it short or falls silent too long."""
        connection, parts = self._connection, []
        while not connection.complete:
            parts += connection.take()  # taken as it comes, so that a paused connection reads on
            await connection.more()
        return b"".join(parts + connection.take())

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; UpstreamError if the upstream cuts it short or falls silent too long."""
        connection = self._connection
        while True:
            arrived = connection.take()
            if arrived:  # more may arrive, and the body end, while these are being relayed: take again first
                for chunk in arrived:
                    yield chunk
            elif connection.complete:
                return
            else:
                await connection.more()

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if the body was read to its end."""
        if self._ended:
            return
        self._ended = True
        connection = self._connection
        if connection.complete and connection.reusable and connection.open:
            self._client.put_back(connection)
        else:
            connection.close()


class UpstreamClient:
    """Pooled keep-alive HTTP/1.1 connections to any number of upstreams; no limit of its own."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, keepalive: float = UPSTREAM_KEEPALIVE_S) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._open: set[_Connection] = set()

    async def send(
        self, origin: Origin, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> Answer:
        """Send one request; the answer's head. UpstreamError if none came (refused, reset or timed out)."""
        head = _request_head(origin, method, target, headers, body)
        connection = self._pooled(origin) or await self._connect(origin)
        connection.begin(head, body)
        try:
            await connection.head()
        except BaseException:  # failed, or cancelled: the client went away first
            connection.close()
            raise
        return Answer(self, connection)

    def put_back(self, connection: _Connection) -> None:
        """Keep `connection` for the next request to its origin."""
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(connection.origin, deque()).append(connection)

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        for connection in list(self._open):
            connection.close()
        self._idle.clear()

    def _pooled(self, origin: Origin) -> _Connection | None:
        """The most recently used idle connection to `origin` still open; older ones past `keepalive` are closed."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        stale = idle[-1].loop.time() - self.keepalive
        while idle and idle[0].idle_since < stale:
            idle.popleft().close()
        while idle:
            connection = idle.pop()
            if connection.open:
                return connection
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.scheme == "https":
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin, self.read_timeout, self._open),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        # Neither message names the upstream: clients read them in their 502s.
        except TimeoutError as exc:
            raise UpstreamError(f"no connection within {self.connect_timeout:g}s") from exc
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else type(exc).__name__
            raise UpstreamError(f"no connection: {reason}") from exc
        return connection


def _header_lines(headers: list[tuple[bytes, bytes]]) -> int:
    return sum(len(name) + len(value) + 3 for name, value in headers)


def _request_head(origin: Origin, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {origin.prefix}{target} HTTP/1.1", f"Host: {origin.host_header}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method in _WITH_CONTENT:
        lines.append(f"Content-Length: {len(body)}")
    text = "\r\n".join(lines) + "\r\n\r\n"
    # Names and values come from a parsed request or from the gateway; a line break in one would be a
    # second header (or a second request) smuggled upstream.
    if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
        raise ValueError("a forwarded header name or value holds a line break")
    return text.encode("latin-1")


class _Connection(asyncio.Protocol):
    """One connection to an upstream: one exchange at a time, its answer parsed as it arrives."""

    def __init__(self, origin: Origin, read_timeout: float, registry: set[_Connection]) -> None:
        self.origin = origin
        self.idle_since = 0.0
        self.open = False
        self._read_timeout = read_timeout
        self._registry = registry
        self._parser = httptools.HttpResponseParser(self)
        self.loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._paused = False
        # The exchange in progress, from `begin` to its end or failure.
        self._busy = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.complete = False
        self.reusable = False
        self._chunked = False
        self._interims = 0
        self._head_read = 0  # bytes of the reads that began while a head was unfinished
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # The exchange, as the client and the answer see it.

    def begin(self, head: bytes, body: bytes) -> None:
        """Send a request; its answer starts now."""
        assert self._transport is not None and not self._busy
        self._busy = True
        self.status, self.headers, self.content_length = 0, [], None
        self.complete = self.reusable = self._chunked = False
        self._interims = self._head_read = 0
        self._chunks, self._buffered, self._error = [], 0, None
        self._head_waiter = self.loop.create_future()
        self._last_read = self.loop.time()
        if self._timer is None:  # one left from an earlier exchange reschedules itself from _last_read
            self._timer = self.loop.call_at(self._last_read + self._read_timeout, self._check_silence)
        if len(body) < 65536:
            self._transport.write(head + body)
        else:
            self._transport.writelines((head, body))

    async def head(self) -> None:
        """Wait for the answer's status and headers."""
        assert self._head_waiter is not None
        await self._head_waiter

    async def more(self) -> None:
        """Wait for more of the body, or its end."""
        if self._error is not None:
            raise self._error
        self._body_waiter = self.loop.create_future()
        await self._body_waiter

    def take(self) -> list[bytes]:
        """The body bytes that have arrived since the last take."""
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunks

    def close(self) -> None:
        if self._busy:  # anyone still waiting on the answer hears of it
            self._fail(UpstreamError("the connection was closed before its answer ended"))
        self._stop_timer()
        if self._transport is not None:
            self._transport.close()
        self.open = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.open = True
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        if not self._busy:  # nothing was asked: the upstream is not speaking HTTP to us
            self.close()
            return
        if not self.status:  # heads are unfinished: this read holds more of them, and maybe more than them
            self._head_read += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._busy:  # not stopped by a callback, which settles the exchange itself
                self._fail(UpstreamError(f"the answer is not valid HTTP: {exc}"))
            self.close()
            return
        # Still unfinished, all that was read is heads: refused here, before httptools holds more of a field.
        if self._busy and not self.status and self._head_read > MAX_HEAD_BYTES:
            self._fail(UpstreamError(_HEAD_TOO_LARGE))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self.open = False
        self._registry.discard(self)
        if not self._busy:
            return
        if self.status and self.content_length is None and not self._chunked:
            self._end()  # an answer of no declared length ends where the connection does
        else:
            self._fail(UpstreamError("the upstream closed the connection before its answer ended"))

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # bytes past the answer's end: whatever they are, they belong to no request
            self.reusable = False
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self.content_length = int(value)
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            self._chunked = True

    def on_headers_complete(self) -> None:
        # Past the bound, the reads held more than heads (a body, or the next head): this head is measured
        # itself, each header line as at least "name:value\r\n" and the status line left out, never more than read.
        if self._head_read > MAX_HEAD_BYTES and _header_lines(self.headers) > MAX_HEAD_BYTES:
            self._refuse(UpstreamError(_HEAD_TOO_LARGE))
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            if status == 101:  # what follows would be another protocol, to be relayed blind
                self._refuse(UpstreamError("the upstream answered 101 Switching Protocols, which is never relayed"))
            self._interims += 1
            if self._interims > MAX_INTERIM:
                self._refuse(UpstreamError(f"the upstream sent more than {MAX_INTERIM} interim 1xx answers"))
            self.headers, self.content_length, self._chunked = [], None, False
            return
        self.status = status
        if self._chunked:
            self.content_length = None
        elif status in (204, 304):
            self.content_length = 0
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status:  # not an interim answer, which leaves the status to the answer that follows
            self._end(reusable=self._parser.should_keep_alive())

    # How an exchange ends.

    def _end(self, *, reusable: bool = False) -> None:
        # The silence timer stays: on a kept connection the next exchange uses it, rather than each
        # exchange setting and cancelling one; `close` stops it, and it lapses by itself when idle.
        self._busy = False
        self.complete, self.reusable = True, reusable
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        self._busy = False
        self._error = error
        self._stop_timer()
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(error)
        self._wake()

    def _refuse(self, error: UpstreamError) -> NoReturn:
        """Fail the exchange and stop the parser: nothing more of this connection is read."""
        self._fail(error)
        raise _Stop

    def _wake(self) -> None:
        waiter, self._body_waiter = self._body_waiter, None
        if waiter is None or waiter.done():
            return
        if self._error is not None:
            waiter.set_exception(self._error)
        else:
            waiter.set_result(None)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_silence(self) -> None:
        self._timer = None
        if not self._busy:
            return
        if self._paused:  # the relay is behind, not the upstream
            self._timer = self.loop.call_later(self._read_timeout, self._check_silence)
            return
        quiet_until = self._last_read + self._read_timeout
        if self.loop.time() < quiet_until:
            self._timer = self.loop.call_at(quiet_until, self._check_silence)
            return
        self._fail(UpstreamError(f"the upstream sent nothing for {self._read_timeout:g}s"))
        self.close()
