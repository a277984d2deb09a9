"""Requests written byte for byte on a plain socket: the attacks an HTTP client library would tidy away."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class RawAnswer:
    """An answer as it came off the wire."""

    status: int
    headers: list[tuple[str, str]]  # lower-case names, in order
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(url: str, request: bytes, *, timeout: float = 30.0) -> RawAnswer:
    """Write `request` in one piece on a fresh connection to `url`'s host; its answer, read to the connection's end.

    `request` should ask for `Connection: close`, or the read waits for the server's keep-alive timeout.
    """
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
    content_length = next((int(value) for name, value in headers if name == "content-length"), None)
    return RawAnswer(int(status_line.split()[1]), headers, body if content_length is None else body[:content_length])


def request_bytes(method: str, target: str, fields: list[tuple[str, str]], body: bytes = b"") -> bytes:
    """An HTTP/1.1 request with exactly `fields` (and Host, Connection: close, a Content-Length for `body`)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in fields]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
