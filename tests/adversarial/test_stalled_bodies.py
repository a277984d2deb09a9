"""Bodies that never arrive: a stalled body is cut off with a 408, and one account's stalls never take the pool.

A real `quotagate serve` process with a pool of a few places; the attacker is a raw socket that declares a
body, sends one byte of it and then nothing.
"""

from __future__ import annotations

import json
import selectors
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.adversarial.wire import RawAnswer
from tests.support.keys import new_key
from tests.support.processes import Service, gateway_processes
from tests.support.quotas import IMAGES, plan, quota_file, quotas_yaml
from tests.support.upstream import StubUpstream, serve_in_thread

pytestmark = pytest.mark.slow

POOL_PLACES = 8
FREE_CONCURRENCY = 2
HOG_CONNECTIONS = 40
REFUSALS = {(429, "concurrency_limit_exceeded"), (503, "overloaded")}

QUOTAS = quotas_yaml(
    plan("free", daily=100, rate=6000, burst=1000, concurrency=FREE_CONCURRENCY),
    pool=f"max_in_flight: {POOL_PLACES}, reserved_for_paid: 0",
)

# The same pool of one place, with no per-account limit: only the body deadline can give the place back.
ONE_PLACE = quotas_yaml(plan("free", daily=100, rate=6000, burst=1000), pool="max_in_flight: 1, reserved_for_paid: 0")


@contextmanager
def served(redis_url: str, tmp_path: Path, quotas: str, body_timeout: float) -> Iterator[Service]:
    path = quota_file(tmp_path, quotas)
    stub = StubUpstream()
    with (
        serve_in_thread(stub.app()) as stub.url,
        gateway_processes(1, path, redis_url, stub.url, tmp_path, QUOTAGATE_BODY_TIMEOUT=str(body_timeout)) as (
            gateway,
        ),
    ):
        yield gateway


def stalled_head(key: str) -> bytes:
    """A request that declares a 1000-byte body and carries its first byte only."""
    head = (
        f"POST {IMAGES} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    return head.encode() + b"{"


def stall(url: str, key: str) -> socket.socket:
    """A connection left holding a stalled request; closed by the caller."""
    parts = urlsplit(url)
    # The timeout bounds a hung test only: an answer that never comes is a failure, not a wait.
    sock = socket.create_connection((parts.hostname, parts.port), timeout=20)
    sock.sendall(stalled_head(key))
    return sock


def answer_on(sock: socket.socket) -> RawAnswer:
    """The one answer the gateway sends on `sock`, read until the connection closes or its body is whole."""
    received = b""
    while True:
        head, found, body = received.partition(b"\r\n\r\n")
        if found:
            lines = head.decode("latin-1").split("\r\n")
            headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
            length = next((int(v) for n, v in headers if n == "content-length"), None)
            if length is not None and len(body) >= length:
                return RawAnswer(int(lines[0].split()[1]), headers, body[:length])
        chunk = sock.recv(65536)
        if not chunk:
            assert found, f"the connection closed without an answer: {received!r}"
            return RawAnswer(int(lines[0].split()[1]), headers, body)
        received += chunk


def answers_from(sockets: list[socket.socket], count: int) -> dict[socket.socket, RawAnswer]:
    """The first `count` answers among `sockets`, by socket, read as they come (the others answer nothing)."""
    answers: dict[socket.socket, RawAnswer] = {}
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        while len(answers) < count:
            ready = selector.select(timeout=20)  # bounds a hung test only
            assert ready, f"{len(answers)} answers of {count}"
            for event, _ in ready:
                answered = event.fileobj
                assert isinstance(answered, socket.socket)
                selector.unregister(answered)
                answers[answered] = answer_on(answered)
    return answers


def generate(gateway: Service, key: str) -> httpx.Response:
    return httpx.post(
        gateway.url + IMAGES, headers={"Authorization": f"Bearer {key}"}, json={"prompt": "cake", "n": 1}, timeout=20
    )


def test_a_stalled_body_is_answered_408_and_its_pool_place_freed(redis_url: str, tmp_path: Path) -> None:
    staller, other = new_key(redis_url, "sam", "free"), new_key(redis_url, "ann", "free")
    with served(redis_url, tmp_path, ONE_PLACE, body_timeout=0.5) as gateway:
        with stall(gateway.url, staller) as sock:
            timed_out = answer_on(sock)
        assert timed_out.status == 408, timed_out
        assert timed_out.json()["error"]["code"] == "request_timeout"
        answer = generate(gateway, other)  # the pool's one place is free again
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"]) == 1


def test_one_accounts_stalled_bodies_never_take_another_accounts_place(redis_url: str, tmp_path: Path) -> None:
    hog, other = new_key(redis_url, "hog", "free"), new_key(redis_url, "ann", "free")
    # A body deadline far past the test: the hog's stalls hold whatever they were given throughout.
    with served(redis_url, tmp_path, QUOTAS, body_timeout=600) as gateway, ExitStack() as open_sockets:
        sockets = [open_sockets.enter_context(stall(gateway.url, hog)) for _ in range(HOG_CONNECTIONS)]
        refused = answers_from(sockets, HOG_CONNECTIONS - FREE_CONCURRENCY)
        for refusal in refused.values():
            # Refused by its own limit, or shed by the pool while the burst's leases were being looked up.
            assert (refusal.status, refusal.json()["error"]["code"]) in REFUSALS, refusal
        # The hog's places are held: one more of its requests is refused too.
        with stall(gateway.url, hog) as extra:
            one_more = answer_on(extra)
            assert (one_more.status, one_more.json()["error"]["code"]) == (429, "concurrency_limit_exceeded"), one_more
        answer = generate(gateway, other)
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.content)["data"]
        held = [sock for sock in sockets if sock not in refused]
        assert len(held) == FREE_CONCURRENCY
        for sock in held:  # still waiting for their bodies, unanswered
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing to read, and not closed
                sock.recv(1)
