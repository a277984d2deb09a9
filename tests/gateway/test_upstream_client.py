"""The gateway's HTTP/1.1 client, against a real socket server that answers exactly the bytes each test scripts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.addresses import Origin
from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.upstream.client import HIGH_WATER, MAX_HEAD_BYTES, MAX_INTERIM, UpstreamClient, UpstreamError

from .scripted_upstream import scripted

pytestmark = pytest.mark.anyio

HANG = 10.0  # seconds; a bound on a hang, not a timing assertion
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HANG_BYTES = 1 << 20  # what an endless head sends before it stalls: far past any bound on a head


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


async def _exchange(c: UpstreamClient, url: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request; the answer's status, headers as received, and whole body."""
    answer = await asyncio.wait_for(c.send(Origin.parse(url), "POST", "/v1/x", [], b"{}"), HANG)
    try:
        return answer.status, list(answer.headers), await asyncio.wait_for(answer.read(), HANG)
    finally:
        answer.release()


OK_AS_SENT = (200, [(b"Content-Length", b"2")], b"ok")
# What a faulty upstream sends past its answer's end: a whole second answer in the same segment, or the
# start of one that a parser left waiting would finish with the next request's answer on that connection.
SECOND_ANSWER = b"HTTP/1.1 404 Not Found\r\nSet-Cookie: session=someone-else\r\nContent-Length: 4\r\n\r\nevil"
UNFINISHED_ANSWER = b"HTTP/1.1 201 Created\r\nSet-Cookie: session=someone-else; x="


@pytest.mark.parametrize("after", [SECOND_ANSWER, UNFINISHED_ANSWER], ids=["second answer", "unfinished answer"])
async def test_bytes_past_an_answers_end_reach_no_answer_and_the_connection_is_never_reused(after: bytes) -> None:
    async with scripted(OK + after, OK) as server, client() as c:
        assert await _exchange(c, server.url) == OK_AS_SENT
        assert await _exchange(c, server.url) == OK_AS_SENT
    assert server.connections == 2


def _framed(body: bytes, chunked: bool) -> bytes:
    if not chunked:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:]) if part)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % chunks


_ANSWER_START = b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1\r\nContent-Length: 3\r\n\r\nabc"
# The parser skips blank lines after an answer, as RFC 9112 §2.2 has a server skip them before a request: they
# carry nothing, so they are left out here.
_trailing_bytes = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.integers(1, len(_ANSWER_START)).map(lambda cut: _ANSWER_START[:cut]),
    st.binary(max_size=50).map(lambda more: _ANSWER_START + more),
).filter(lambda after: after.strip(b"\r\n") != b"")


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=100), chunked=st.booleans(), after=_trailing_bytes)
def test_whatever_follows_an_answer_its_reader_gets_that_answer_alone_and_the_next_a_fresh_connection(
    body: bytes, chunked: bool, after: bytes
) -> None:
    async def two_exchanges() -> tuple[tuple[int, bytes], tuple[int, bytes], int]:
        async with scripted(_framed(body, chunked) + after, OK) as server, client() as c:
            first, second = await _fetch(c, server.url), await _fetch(c, server.url)
        return first, second, server.connections

    assert asyncio.run(two_exchanges()) == ((200, body), (200, b"ok"), 2)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + OK,
    ],
    ids=["upgrade", "101 then an answer"],
)
async def test_an_upstream_switching_protocols_is_an_upstream_error_never_relayed(answer: bytes) -> None:
    async with scripted(answer, OK) as server, client() as c:
        with pytest.raises(UpstreamError) as refused:
            await _fetch(c, server.url)
        assert str(refused.value) == "the upstream answered 101 Switching Protocols, which is never relayed"
        assert await _fetch(c, server.url) == (200, b"ok")
    assert server.connections == 2


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


async def test_up_to_eight_interim_answers_are_passed_over_and_a_ninth_is_an_upstream_error() -> None:
    async with scripted(EARLY_HINTS * MAX_INTERIM + OK, EARLY_HINTS * (MAX_INTERIM + 1) + OK) as server, client() as c:
        assert await _exchange(c, server.url) == OK_AS_SENT
        with pytest.raises(UpstreamError) as refused:
            await _fetch(c, server.url)
    assert str(refused.value) == "the upstream sent more than 8 interim 1xx answers"


def _head_of(size: int) -> bytes:
    """An answer whose head, status line to blank line, is `size` bytes (given room for one header)."""
    start, end = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Padding: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end + b"ok"


async def test_an_answer_head_of_64_kib_is_read_and_a_larger_one_is_an_upstream_error() -> None:
    # Heads are counted by their header lines, less the status line's few bytes: over by a line is refused.
    one_large = _head_of(MAX_HEAD_BYTES + 100)
    many = b"HTTP/1.1 200 OK\r\n" + b"X-Many: %s\r\n" % (b"m" * 100) * 700 + b"Content-Length: 2\r\n\r\nok"
    async with scripted(_head_of(MAX_HEAD_BYTES), one_large, many) as server, client() as c:
        assert await _fetch(c, server.url) == (200, b"ok")
        for _ in range(2):
            with pytest.raises(UpstreamError) as refused:
                await _fetch(c, server.url)
            assert str(refused.value) == "the answer's head is larger than 64 KiB"


async def test_a_head_that_never_ends_is_an_upstream_error_once_past_64_kib() -> None:
    async def endless_head(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(HANG_BYTES // 4096):  # one header value, sent on and on: it is never complete
            writer.write(b"e" * 4096)
            await writer.drain()
        await asyncio.sleep(HANG)

    async with scripted(endless_head) as server, client() as c:
        with pytest.raises(UpstreamError) as refused:
            await _fetch(c, server.url)
    assert str(refused.value) == "the answer's head is larger than 64 KiB"


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
