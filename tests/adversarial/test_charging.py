"""The charging rule against a client who hangs up: charged once the backend has begun, refunded when the path fails.

A real `quotagate serve` process in front of a steerable image service (charging_upstream.py); the
client is a raw socket that closes where a library client would have read on.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.adversarial.charging_upstream import ChargingUpstream
from tests.support.keys import new_key
from tests.support.processes import Service, gateway_processes
from tests.support.quotas import IMAGES, plan, quota_file, quotas_yaml
from tests.support.upstream import serve_in_thread

pytestmark = pytest.mark.slow

QUOTAS = quotas_yaml(plan("free", daily=10, rate=600, burst=100))


@contextmanager
def served(redis_url: str, tmp_path: Path) -> Iterator[tuple[Service, ChargingUpstream, str]]:
    quotas = quota_file(tmp_path, QUOTAS)
    upstream = ChargingUpstream()
    with (
        serve_in_thread(upstream.app()) as url,
        gateway_processes(1, quotas, redis_url, url, tmp_path) as (gateway,),
    ):
        yield gateway, upstream, url


def used(gateway: Service, key: str) -> int:
    quota = httpx.get(gateway.url + "/v1/quota", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    (daily,) = (limit for limit in quota["limits"] if limit["kind"] == "daily")
    return int(daily["used"])


def settled(gateway: Service, outcome: str) -> None:
    """Wait until the gateway has counted one request ended with `outcome` (its charge is settled by then)."""
    deadline = time.monotonic() + 60
    while (gateway.metric("quotagate_requests_total", outcome=outcome, plan="free", route=IMAGES) or 0) < 1:
        assert time.monotonic() < deadline, gateway.logged()
        time.sleep(0.02)


def request(key: str, prompt: str, n: int, *, idempotency_key: str | None = None) -> bytes:
    body = b'{"prompt": "%s", "n": %d}' % (prompt.encode(), n)
    head = f"POST {IMAGES} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
    if idempotency_key is not None:
        head += f"Idempotency-Key: {idempotency_key}\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


def connect(url: str, *, slow_reader: bool = False) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    if slow_reader:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, as on a real network
    return sock


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One answer of known length off a kept-alive connection: its head and its body."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    fields = head.lower().split(b"\r\n")
    (length,) = (int(line.split(b":")[1]) for line in fields if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_hanging_up_on_a_streamed_answer_is_charged(redis_url: str, tmp_path: Path) -> None:
    key = new_key(redis_url, "ann", "free")
    with served(redis_url, tmp_path) as (gateway, _, _url):
        with connect(gateway.url, slow_reader=True) as sock:
            sock.sendall(request(key, "big", 3))
            received = b""
            while b"\r\n\r\n" not in received or len(received) < 64 << 10:
                received += sock.recv(4096)
            assert received.startswith(b"HTTP/1.1 200")
        settled(gateway, "client_gone")
        assert used(gateway, key) == 3


def hang_up_while_held(gateway: Service, upstream: ChargingUpstream, url: str, held: bytes) -> None:
    """Send `held` (a "held" request), hang up once the backend has begun it, then let the backend answer."""
    with connect(gateway.url) as sock:
        sock.sendall(held)
        deadline = time.monotonic() + 30
        while upstream.begun < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    # The gateway withdraws the request; the backend says it has begun, and then makes it.
    while upstream.withdrawals < 1:
        assert time.monotonic() < deadline, gateway.logged()
        time.sleep(0.02)
    httpx.post(url + "/control/release", timeout=10)
    settled(gateway, "client_gone")


def test_hanging_up_while_the_backend_works_is_charged(redis_url: str, tmp_path: Path) -> None:
    key = new_key(redis_url, "ann", "free")
    with served(redis_url, tmp_path) as (gateway, upstream, url):
        hang_up_while_held(gateway, upstream, url, request(key, "held", 2))
        assert used(gateway, key) == 2


def test_a_client_gone_while_the_backend_worked_gets_its_paid_images_when_it_retries_with_its_key(
    redis_url: str, tmp_path: Path
) -> None:
    key = new_key(redis_url, "ann", "free")
    with served(redis_url, tmp_path) as (gateway, upstream, url):
        hang_up_while_held(gateway, upstream, url, request(key, "held", 2, idempotency_key="retry-me"))
        with connect(gateway.url) as sock:
            sock.sendall(request(key, "held", 2, idempotency_key="retry-me"))
            head, body = read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"idempotent-replayed: true" in head.lower()
        assert json.loads(body)["data"] == [{"b64_json": "aW1hZ2U="}]  # what the backend made for it
        assert upstream.begun == 1  # the retry never reached the backend
        assert used(gateway, key) == 2  # charged once


def test_an_answer_the_upstream_cuts_short_is_refunded(redis_url: str, tmp_path: Path) -> None:
    key = new_key(redis_url, "ann", "free")
    with served(redis_url, tmp_path) as (gateway, _, _url):
        with connect(gateway.url) as sock:
            sock.sendall(request(key, "cut", 3))
            while sock.recv(65536):
                pass
        settled(gateway, "upstream_error")
        assert used(gateway, key) == 0
        refunded = gateway.metric("quotagate_images_refunded_total", plan="free", reason="upstream_error")
        assert refunded == 3
