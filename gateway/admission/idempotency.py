"""The Idempotency-Key header (draft-ietf-httpapi-idempotency-key-header): read it, bind it, replay its answer.

A key is bound to the account and to the request's fingerprint: its method, its target (path and
query) and the SHA-256 of its body. The engine decides what the key says before any limit is looked
at (limits.KeyState): a first request claims it and is charged; the same request again gets the first
one's answer from Redis, or 409 while the first is in flight; another request with the key gets 422.
This module turns those states into answers, and keeps a copy of the answer a claimed request sends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from starlette.types import Message, Scope, Send

from gateway.errors import (
    ApiError,
    BadRequest,
    IdempotencyAnswerExpired,
    IdempotencyAnswerNotKept,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
)
from limits import Decision, KeyState

# What the key alone refuses (counted as the outcome idempotency_refused).
REFUSED = (IdempotencyKeyInFlight, IdempotencyKeyReused)
HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255
# The fields of the first answer a replay carries again; the rest describe that one exchange.
REPLAYED_FIELDS = frozenset({b"content-type", b"content-encoding", b"content-language"})


class Replayed(Exception):
    """The request's key has a kept answer: that is the answer, sent again with `replay`; nothing is charged."""

    def __init__(self, answer: bytes) -> None:
        super().__init__("replayed")
        self.answer = answer


@dataclass(frozen=True, slots=True)
class RequestKey:
    """A request's Idempotency-Key and its fingerprint."""

    key: str
    fingerprint: str


def key_of(headers: Mapping[str, str]) -> str | None:
    """The request's Idempotency-Key, None if it has none; BadRequest if it is malformed.

    The draft's form is a Structured Field string (`"8e03978e-..."`); a bare token is taken too, as the
    same key. Either way the key is 1 to 255 visible ASCII characters (no spaces nor controls).
    """
    value = headers.get(HEADER)
    if value is None:
        return None
    key = _unquoted(value) if value.startswith('"') else value
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all("!" <= c <= "~" for c in key):
        raise BadRequest(
            f"`Idempotency-Key` must be 1 to {MAX_KEY_LENGTH} visible ASCII characters, bare or as a quoted "
            'string (`Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`), sent once.',
            param="Idempotency-Key",
        )
    return key


def _unquoted(value: str) -> str:
    """The content of an RFC 8941 sf-string; '' (refused by the caller) if `value` is not exactly one."""
    chars, i = [], 1
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in '"\\':
            chars.append(value[i + 1])
            i += 2
        elif c == '"':
            return "".join(chars) if i == len(value) - 1 else ""
        elif c == "\\":
            return ""
        else:
            chars.append(c)
            i += 1
    return ""  # never closed


def bind(key: str, scope: Scope, body: bytes) -> RequestKey:
    """`key` bound to the request: SHA-256 of its method, path and query, and its body's own SHA-256."""
    target = f"{scope['method']} {scope['path']}?".encode() + scope["query_string"]
    digest = hashlib.sha256(target + b"\n")
    digest.update(hashlib.sha256(body).digest())
    return RequestKey(key, digest.hexdigest())


def refusal(decision: Decision) -> ApiError | None:
    """The answer when the key alone answers the request and no answer is kept to replay; None otherwise."""
    match decision.key_state:
        case KeyState.IN_FLIGHT:
            return IdempotencyKeyInFlight(
                "A request with this Idempotency-Key is still in progress; retry once it has ended.",
                headers={"Retry-After": "1"},
            )
        case KeyState.REUSED:
            return IdempotencyKeyReused(
                "This Idempotency-Key was used for a different request (method, path or body); "
                "send a new key for a new request."
            )
        case KeyState.NOT_KEPT:
            return IdempotencyAnswerNotKept(
                "The request with this Idempotency-Key was served and charged, but its answer was not kept "
                "(too large, or not all delivered), so it cannot be replayed; send a new key to ask again."
            )
        case KeyState.EXPIRED:
            return IdempotencyAnswerExpired(
                "The answer to the request with this Idempotency-Key has expired (answers are kept 24 hours); "
                "send a new key to ask again."
            )
    return None


class AnswerCapture:
    """`send` for a request that claimed a key: a copy of the answer goes to `keep` before its last part is sent.

    So a client that has the whole answer finds it kept when it asks again. `keep` gets None when the
    answer is over `limit` bytes, or (from `finish`) when it never went out whole.
    """

    __slots__ = ("_done", "_head", "_keep", "_limit", "_parts", "_send", "_size")

    def __init__(self, send: Send, limit: int, keep: Callable[[bytes | None], Awaitable[object]]) -> None:
        self._send = send
        self._limit = limit
        self._keep = keep
        self._head = b""
        self._parts: list[bytes] | None = []  # None: over the limit
        self._size = 0
        self._done = False

    async def __call__(self, message: Message, *, sending: bool = True) -> None:
        if message["type"] == "http.response.start":
            fields = [name + b": " + value + b"\r\n" for name, value in message["headers"] if name in REPLAYED_FIELDS]
            self._head = b"%d\r\n%s\r\n" % (message["status"], b"".join(fields))
            self._size = len(self._head)
        elif message["type"] == "http.response.body" and not self._done:
            chunk = message.get("body", b"")
            self._size += len(chunk)
            if self._parts is not None and self._size <= self._limit:
                self._parts.append(chunk)
            else:
                self._parts = None
            if not message.get("more_body", False):
                self._done = True
                await self._keep(None if self._parts is None else self._head + b"".join(self._parts))
        if sending:
            await self._send(message)

    async def keep_unsent(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Keep a whole answer its client left before: the backend made and charged it, so a retry gets it."""
        await self({"type": "http.response.start", "status": status, "headers": headers}, sending=False)
        await self({"type": "http.response.body", "body": body}, sending=False)

    async def finish(self) -> None:
        """The request is over: if its answer did not go out whole, say that none is kept."""
        if not self._done:
            self._done = True
            await self._keep(None)


async def replay(kept: bytes, headers: Mapping[str, str], send: Send) -> int:
    """Send an answer `AnswerCapture` kept, with `headers` (this exchange's own) added; its status."""
    head, _, body = kept.partition(b"\r\n\r\n")
    status_line, *field_lines = head.split(b"\r\n")
    fields = [tuple(line.split(b": ", 1)) for line in field_lines if line]
    fields += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    fields += [(b"idempotent-replayed", b"true"), (b"content-length", b"%d" % len(body))]
    status = int(status_line)
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})
    return status
