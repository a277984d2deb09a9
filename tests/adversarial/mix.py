"""An adversarial client's moves against a running gateway, on raw sockets, and the images each brought back.

Each move is one request written byte for byte, abandoned or stalled where a library client would have
read on. An image counts as received once its whole base64 string has arrived in a 2xx answer, even
one the client broke off: a client that hangs up mid-answer keeps what it has.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from .wire import request_bytes

IMAGES = "/v1/images/generations"
SIZE = "64x64"  # the smallest size the tiny model makes: ~50 ms an image on one core
IMAGE = re.compile(rb'"b64_json"\s*:\s*"([A-Za-z0-9+/=]*)"')
# Seconds a move waits for the gateway at most: a guard against a hung run, never a measure of anything.
PATIENCE = 60.0

Leaving = Literal["after_head", "mid_body", "after_body"]


@dataclass(frozen=True)
class Received:
    """What the client holds after a move: the answer's status (None: it left first), and whole images."""

    status: int | None
    images: tuple[str, ...] = ()


def generation(prompt: str, n: int) -> bytes:
    """An Images API body for `n` images of `prompt`."""
    return json.dumps({"prompt": prompt, "n": n, "size": SIZE, "response_format": "b64_json"}).encode()


@dataclass(frozen=True)
class Client:
    """One API key's moves against the gateway at `url`."""

    url: str
    key: str

    def send(self, body: bytes, idempotency_key: str | None = None) -> Received:
        """A well-formed request, its answer read to the end."""
        with self._connect() as sock:
            sock.sendall(self._head(len(body), idempotency_key) + body)
            return read_answer(sock)

    def leave(self, body: bytes, at: Leaving, idempotency_key: str | None = None) -> Received:
        """Send the head, then some of the body, or all of it, and close without reading anything."""
        sent = {"after_head": b"", "mid_body": body[: len(body) // 2], "after_body": body}[at]
        with self._connect() as sock:
            sock.sendall(self._head(len(body), idempotency_key) + sent)
        return Received(None)

    def read_part(self, body: bytes, length: int, idempotency_key: str | None = None) -> Received:
        """A whole request; then read `length` bytes of the answer at most, and close."""
        with self._connect() as sock:
            sock.sendall(self._head(len(body), idempotency_key) + body)
            return read_answer(sock, length)

    def stall(self, body: bytes, sent: int, then: Literal["close", "wait"]) -> Received:
        """Declare the whole body, send `sent` bytes of it; close, or wait for what the gateway says."""
        with self._connect() as sock:
            sock.sendall(self._head(len(body)) + body[:sent])
            return Received(None) if then == "close" else read_answer(sock)

    def chunked(self, body: bytes, *, key_in_head: bool) -> Received:
        """A chunked body whose trailer section carries the key (and the head too, if `key_in_head`)."""
        lines = [f"POST {IMAGES} HTTP/1.1", "Host: gateway", "Connection: close", "Transfer-Encoding: chunked"]
        lines += ["Content-Type: application/json", "Trailer: Authorization"]
        if key_in_head:
            lines.append(f"Authorization: Bearer {self.key}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        trailer = f"Authorization: Bearer {self.key}\r\n".encode("latin-1")
        with self._connect() as sock:
            sock.sendall(head + b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailer))
            return read_answer(sock)

    def burst(self, requests: Sequence[tuple[bytes, str | None]]) -> list[Received]:
        """Every (body, Idempotency-Key) at once, one connection and one thread each."""
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(lambda request: self.send(*request), requests))

    def _head(self, length: int, idempotency_key: str | None = None) -> bytes:
        fields = [("Authorization", f"Bearer {self.key}"), ("Content-Type", "application/json")]
        fields.append(("Content-Length", str(length)))
        if idempotency_key is not None:
            fields.append(("Idempotency-Key", f'"{idempotency_key}"'))
        return request_bytes("POST", IMAGES, fields)

    def _connect(self) -> socket.socket:
        parts = urlsplit(self.url)
        return socket.create_connection((parts.hostname, parts.port), timeout=PATIENCE)


def read_answer(sock: socket.socket, limit: int | None = None) -> Received:
    """Read an answer to the connection's end (or `limit` bytes of it): its status and the whole images in it."""
    received = b""
    while limit is None or len(received) < limit:
        try:
            chunk = sock.recv(65536 if limit is None else min(65536, limit - len(received)))
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return answer_of(received)


def answer_of(received: bytes) -> Received:
    """The status and whole images of an answer as far as it arrived."""
    head, separator, body = received.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        return Received(None)
    status = int(status_line[1])
    if not separator or not 200 <= status < 300:
        return Received(status)
    if re.search(rb"(?im)^transfer-encoding:.*chunked", head):
        body = _dechunked(body)
    return Received(status, tuple(match.decode() for match in IMAGE.findall(body)))


def _dechunked(data: bytes) -> bytes:
    """A chunked body's content as far as it arrived, the last chunk's part included."""
    content = b""
    while True:
        size_line, separator, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return content
        if not separator or size == 0:
            return content
        content += rest[:size]
        data = rest[size + 2 :]
