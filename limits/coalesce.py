"""Send the script calls of one event-loop turn to Redis in one write, and read the replies in order.

One redis-py EVALSHA costs ~55 µs of client CPU here, and redis-py's per-reply read alone ~9 µs,
where hiredis alone parses a reply in ~1 µs. So the engine keeps one connection of its own: calls
made while the loop runs other requests' code are queued, packed by hiredis and written together on
the next turn; replies are parsed by hiredis as they arrive, in the transport's own callback (no
reader task, no stream), and each goes to its caller in the order Redis answers (the order they were
written). A lone call waits for nothing: its turn ends at once.

The connection is the engine's own socket (TCP, TLS or unix), opened with asyncio's public transport
API and greeted as the redis-py client it mirrors would greet it (limits/endpoint.py): it leans on
nothing inside redis-py, whose exceptions it raises so callers handle one family of errors.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from limits.endpoint import Endpoint


def _pack(*parts: str | bytes | int | float | None) -> bytes:
    # hiredis's stub types the tuple as one item long; any number of items is accepted.
    packed: bytes = hiredis.pack_command(parts)  # type: ignore[arg-type]
    return packed


class Script:
    """A Lua script known by its SHA1; loaded into Redis the first time Redis says NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.load_command = _pack(b"SCRIPT", b"LOAD", source)


class _Call:
    """One command on its way: its bytes, who waits for the reply, and when to give up on it."""

    __slots__ = ("command", "deadline", "future", "reloaded", "script")

    def __init__(self, script: Script | None, command: bytes, future: asyncio.Future[Any] | None) -> None:
        self.script = script
        self.command = command
        self.future = future
        self.deadline = 0.0
        self.reloaded = False


class Coalescer:
    """EVALSHA calls, written per event-loop turn on one connection, answered in order."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._queue: list[_Call] = []  # made during this turn, not yet written
        self._link: _Link | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    async def call(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """The script's reply; Redis errors are raised as redis-py exceptions."""
        if self._closed:
            raise RedisConnectionError("the engine's redis connection is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        command = hiredis.pack_command((b"EVALSHA", script.sha, len(keys), *keys, *args))
        self._queue.append(_Call(script, command, future))
        if len(self._queue) == 1:
            if self._link is not None and not self._link.sent:
                # Nothing awaited: no batch is forming behind a reply, so write now rather than at the
                # turn's end (one loop pass less for a lone request; under load replies are awaited).
                self._flush()
            else:
                loop.call_soon(self._flush)
        return await future

    @property
    def awaiting(self) -> int:
        """Calls written and not yet answered."""
        return 0 if self._link is None else len(self._link.sent)

    @property
    def queued(self) -> int:
        """Calls made this turn, not yet written."""
        return len(self._queue)

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail, later ones are refused."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.wait([self._connecting])
        _fail(self._queue, RedisConnectionError("the engine's redis connection is closed"))
        self._queue = []
        if self._link is not None:
            await self._link.close(RedisConnectionError("the engine's redis connection is closed"))

    def _flush(self) -> None:
        if not self._queue:
            return
        if self._link is None:
            if self._connecting is None and not self._closed:
                self._connecting = asyncio.create_task(self._connect())
            return  # _connect writes the queue once it has a connection
        batch, self._queue = self._queue, []
        self._link.write(batch)

    async def _connect(self) -> None:
        try:
            link = await _Link.open(self._endpoint, on_lost=self._lost)
        except Exception as exc:  # noqa: BLE001 - every queued caller hears of it
            _fail(self._queue, RedisConnectionError(f"cannot connect to redis: {exc}"))
            self._queue = []
            return
        finally:
            self._connecting = None
        self._link = link
        self._flush()

    def _lost(self, link: _Link) -> None:
        if link is self._link:
            self._link = None  # the next call connects again


class _Link(asyncio.Protocol):
    """One socket to Redis: each reply is parsed as its bytes arrive and settles the oldest call written."""

    def __init__(self, reply_timeout: float, on_lost: Callable[[_Link], None]) -> None:
        self._timeout = reply_timeout
        self._on_lost = on_lost
        self._parser = hiredis.Reader(replyError=ResponseError)
        self.sent: deque[_Call] = deque()  # written, waiting for their replies, oldest first
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._error: Exception | None = None  # why the link is down, once it is
        self._gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, endpoint: Endpoint, on_lost: Callable[[_Link], None]) -> _Link:
        """A connected, greeted link; raises if Redis cannot be reached or refuses the greeting."""
        loop = asyncio.get_running_loop()

        def made() -> _Link:
            return cls(endpoint.reply_timeout, on_lost)

        if endpoint.path is not None:
            connecting = loop.create_unix_connection(made, endpoint.path)
        else:
            connecting = loop.create_connection(
                made, endpoint.host, endpoint.port, ssl=endpoint.tls, server_hostname=endpoint.server_hostname
            )
        try:
            _, link = await asyncio.wait_for(connecting, endpoint.connect_timeout)
        except TimeoutError as exc:  # the socket or the TLS handshake took too long
            raise RedisTimeoutError(f"no connection within {endpoint.connect_timeout} s") from exc
        greeting = [_pack(*command) for command in endpoint.greeting()]
        if greeting:
            futures = [loop.create_future() for _ in greeting]
            link.write([_Call(None, command, future) for command, future in zip(greeting, futures, strict=True)])
            try:
                for future in futures:
                    reply = await future
                    if isinstance(reply, Exception):
                        raise reply
            except BaseException:
                await link.close(RedisConnectionError("the greeting failed"))
                raise
        return link

    def write(self, calls: list[_Call]) -> None:
        if self._error is not None or self._transport is None:
            _fail(calls, self._error or RedisConnectionError("redis connection lost"))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        for call in calls:
            call.deadline = deadline
        self._transport.write(b"".join(call.command for call in calls))
        self.sent.extend(calls)
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._check_deadline)

    async def close(self, error: Exception) -> None:
        """Fail what waits, close the socket, and return once it is closed."""
        self._down(error)
        await asyncio.shield(self._gone)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not subclasses of asyncio.Transport, but have its methods).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed(data)
            while (reply := self._parser.gets()) is not False:
                if not self.sent:  # bytes nothing asked for: the stream cannot be trusted
                    raise hiredis.ProtocolError("a reply to no command")
                self._settle(self.sent.popleft(), reply)
        except hiredis.ProtocolError as exc:
            self._down(RedisConnectionError(f"redis sent what is not RESP: {exc}"))

    def eof_received(self) -> bool:
        self._down(RedisConnectionError("redis closed the connection"))
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._down(RedisConnectionError(f"redis connection lost: {exc or 'closed'}"))
        if not self._gone.done():
            self._gone.set_result(None)

    def _settle(self, call: _Call, reply: Any) -> None:
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            if call.script is not None and not call.reloaded:
                # Redis restarted or was flushed: load the script, then send the call again behind it.
                call.reloaded = True
                self.write([_Call(None, call.script.load_command, None), call])
                return
            reply = NoScriptError(str(reply))
        if call.future is None or call.future.done():  # a SCRIPT LOAD, or a caller that gave up
            return
        if isinstance(reply, Exception) and call.script is not None:
            call.future.set_exception(reply)
        else:  # the greeting's replies, errors included, are read by Link.open
            call.future.set_result(reply)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self.sent or self._error is not None:
            return
        loop = asyncio.get_running_loop()
        if self.sent[0].deadline <= loop.time():
            self._down(RedisTimeoutError(f"redis did not answer within {self._timeout} s"))
        else:
            self._watchdog = loop.call_at(self.sent[0].deadline, self._check_deadline)

    def _down(self, error: Exception) -> None:
        """Give up on this link (once): every call still waiting on it fails; the coalescer connects anew."""
        if self._error is not None:
            return
        self._error = error
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        sent, self.sent = list(self.sent), deque()
        _fail(sent, error)
        if self._transport is not None:
            self._transport.close()
        elif not self._gone.done():
            self._gone.set_result(None)
        self._on_lost(self)


def _fail(calls: list[_Call], error: Exception) -> None:
    for call in calls:
        if call.future is not None and not call.future.done():
            call.future.set_exception(error)
