"""The gateway's HTTP/1.1 client, against a real socket server that answers exactly the bytes each test scripts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from gateway.errors import ConfigError
from gateway.settings import Settings
from gateway.upstream_client import HIGH_WATER, Origin, UpstreamClient, UpstreamError

pytestmark = pytest.mark.anyio

HANG = 10.0  # seconds; a bound on a hang, not a timing assertion
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Scripted:
    """A TCP server: for each request it reads, it sends the next answer of `answers` (bytes, or a callable
    that gets the writer and does what it likes); it records each request and counts connections."""

    answers: list[bytes | Callable[[asyncio.StreamWriter], object]]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    url: str = ""
    asked: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                self.asked.set()
                answer = self.answers.pop(0)
                if callable(answer):
                    result = answer(writer)
                    if asyncio.iscoroutine(result):
                        await result
                else:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(*answers: bytes | Callable[[asyncio.StreamWriter], object]) -> AsyncIterator[Scripted]:
    server = Scripted(list(answers))
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    async with listening:
        yield server


@asynccontextmanager
async def client(read_timeout: float = HANG, keepalive: float = 4.0) -> AsyncIterator[UpstreamClient]:
    upstream_client = UpstreamClient(connect_timeout=HANG, read_timeout=read_timeout, keepalive=keepalive)
    try:
        yield upstream_client
    finally:
        await upstream_client.close()


async def _fetch(c: UpstreamClient, url: str, body: bytes = b"{}", method: str = "POST") -> tuple[int, bytes]:
    answer = await asyncio.wait_for(c.send(Origin.parse(url), method, "/v1/x", [("X-Test", "1")], body), HANG)
    try:
        return answer.status, await asyncio.wait_for(answer.read(), HANG)
    finally:
        answer.release()


async def test_the_request_carries_host_prefix_headers_and_length_and_the_connection_is_reused() -> None:
    async with scripted(OK, OK) as server, client() as c:
        origin = server.url + "/api"
        assert await _fetch(c, origin) == (200, b"ok")
        assert await _fetch(c, origin, method="GET", body=b"") == (200, b"ok")
    port = server.url.rsplit(":", 1)[1]
    assert server.requests[0] == (
        f"POST /api/v1/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Test: 1\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    assert server.requests[1] == f"GET /api/v1/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Test: 1\r\n\r\n".encode()
    assert server.connections == 1  # kept alive


async def test_an_answer_that_says_close_or_an_idle_connection_past_keepalive_is_not_reused() -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with scripted(closing) as server, client() as c:
        assert await _fetch(c, server.url) == (200, b"ok")
        server.answers.append(OK)
        assert await _fetch(c, server.url) == (200, b"ok")
    assert server.connections == 2
    async with scripted(OK) as server, client(keepalive=0) as c:  # every idle connection is already too old
        assert await _fetch(c, server.url) == (200, b"ok")
        server.answers.append(OK)
        assert await _fetch(c, server.url) == (200, b"ok")
    assert server.connections == 2


async def test_chunked_answers_interim_answers_and_answers_read_to_the_connections_end() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    async with scripted(chunked, interim) as server, client() as c:
        assert await _fetch(c, server.url) == (200, b"abcde")
        assert await _fetch(c, server.url) == (200, b"ok")
    assert server.connections == 1

    def until_close(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nto the end")
        writer.close()

    async with scripted(until_close) as server, client() as c:
        assert await _fetch(c, server.url) == (200, b"to the end")


async def test_a_large_body_streams_through_whole_while_reading_pauses_and_resumes() -> None:
    body = bytes(range(256)) * (3 * HIGH_WATER // 256)
    async with scripted(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body) as server, client() as c:
        answer = await c.send(Origin.parse(server.url), "POST", "/", [], b"")
        assert answer.content_length == len(body)
        received, paused = bytearray(), False
        async for chunk in answer.chunks():
            received += chunk
            for _ in range(20):  # a slow reader: the connection's buffer fills past HIGH_WATER
                paused |= answer._connection._paused
                await asyncio.sleep(0)
        assert bytes(received) == body and answer.complete
        assert paused
        answer.release()


async def test_a_body_larger_than_the_high_water_mark_is_read_whole() -> None:
    body = b"x" * (3 * HIGH_WATER)
    async with scripted(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body) as server, client() as c:
        assert await _fetch(c, server.url) == (200, body)


async def test_closing_the_client_ends_every_answer_still_awaited() -> None:
    async def stall(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(HANG)

    async with scripted(stall) as server, client() as c:
        answer = await c.send(Origin.parse(server.url), "POST", "/", [], b"")
        reading = asyncio.ensure_future(answer.read())
        await asyncio.sleep(0)  # the read is waiting for more
        await c.close()
        with pytest.raises(UpstreamError, match="closed before its answer ended"):
            await asyncio.wait_for(reading, HANG)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", "closed the connection before its answer ended"),  # no head at all
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd", "closed the connection before its answer ended"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", "before its answer ended"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not valid HTTP"),
    ],
)
async def test_an_answer_cut_short_or_not_http_is_an_upstream_error(answer: bytes, message: str) -> None:
    def then_close(writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        writer.close()

    async with scripted(then_close) as server, client() as c:
        with pytest.raises(UpstreamError, match=message):
            await _fetch(c, server.url)
    assert server.requests  # it was asked, and answered badly


async def test_silence_past_the_read_timeout_is_an_upstream_error_and_the_connection_is_dropped() -> None:
    async def stall(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(HANG)

    async with scripted(stall) as server, client(read_timeout=0.1) as c:
        answer = await c.send(Origin.parse(server.url), "POST", "/", [], b"")
        assert answer.status == 200
        with pytest.raises(UpstreamError, match="sent nothing for 0.1s"):
            await asyncio.wait_for(answer.read(), HANG)
        answer.release()
        assert not c._idle.get(Origin.parse(server.url))  # a broken connection is never pooled


async def test_silence_on_a_kept_connection_is_timed_from_its_own_request() -> None:
    async def stall(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(HANG)

    async with scripted(OK, stall) as server, client(read_timeout=0.1) as c:
        assert await _fetch(c, server.url) == (200, b"ok")
        with pytest.raises(UpstreamError, match="sent nothing for 0.1s"):
            await _fetch(c, server.url)  # the first exchange's timer, kept, checks the second
    assert server.connections == 1


async def test_no_connection_is_an_upstream_error_that_does_not_name_the_upstream() -> None:
    async with client() as c:
        with pytest.raises(UpstreamError) as refused:
            await c.send(Origin.parse("http://127.0.0.1:9"), "POST", "/", [], b"")
    assert str(refused.value) == "no connection: Connection refused"  # clients read it: no address in it


async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent() -> None:
    async with scripted(OK) as server, client() as c:
        for bad in (("X-A", "1\r\nX-Smuggled: 1"), ("X-A\nX-B", "1")):
            with pytest.raises(ValueError, match="line break"):
                await c.send(Origin.parse(server.url), "POST", "/", [bad], b"")
    assert server.requests == [] and server.connections == 0


async def test_a_request_cancelled_while_waiting_closes_its_connection() -> None:
    async def never(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(HANG)

    async with scripted(never, OK) as server, client() as c:
        waiting = asyncio.ensure_future(c.send(Origin.parse(server.url), "POST", "/", [], b""))
        await asyncio.wait_for(server.asked.wait(), HANG)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await _fetch(c, server.url) == (200, b"ok")  # on a new connection: the old one was never pooled
    assert server.connections == 2


def test_origins_parse_scheme_host_port_and_prefix() -> None:
    assert Origin.parse("http://backend:8001/api/") == Origin("http", "backend", 8001, "/api", "backend:8001")
    assert Origin.parse("https://images.example") == Origin("https", "images.example", 443, "", "images.example")
    assert Origin.parse("http://[::1]:81") == Origin("http", "::1", 81, "", "[::1]:81")
    with pytest.raises(ValueError, match="not an http"):
        Origin.parse("ftp://backend")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://backend", "'ftp://backend' is not an http:// or https:// URL with a host"),
        ("http://:8001", "'http://:8001' is not an http:// or https:// URL with a host"),
        ("http://backend:port", "Port could not be cast to integer value as 'port'"),
    ],
)
def test_an_upstream_url_that_is_not_one_is_refused_at_start(url: str, message: str) -> None:
    environ = {"QUOTAGATE_CONFIG": "q.yaml", "QUOTAGATE_REDIS_URL": "redis://r", "QUOTAGATE_KEY_SECRET": "s" * 16}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({**environ, "QUOTAGATE_UPSTREAMS": f"diffusion={url}"})
    assert str(refused.value) == f"QUOTAGATE_UPSTREAMS: diffusion: {message}"
