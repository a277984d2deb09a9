"""One log line per proxied request: who, which plan and route, what was decided, and how long each step took.

The proxy fills a `RequestRecord` (reached as `request.state.record`) as it learns each fact; the
wrapper writes it when the answer is ready. API keys are never recorded, and a prompt only when the
operator asks for it (`QUOTAGATE_LOG_PROMPTS=1`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.errors import ApiError

log = logging.getLogger("quotagate.request")

Endpoint = Callable[[Request], Awaitable[Response]]

# A client's X-Request-Id is kept if it is short and printable; otherwise a new one is made.
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass(slots=True)
class RequestRecord:
    """What is known of one request so far; None where it never got that far."""

    request_id: str
    method: str
    path: str
    route: str | None = None
    account: str | None = None
    plan: str | None = None
    outcome: str | None = None
    cost: int | None = None
    status: int | None = None
    upstream_status: int | None = None
    decision_ms: float | None = None
    upstream_ms: float | None = None
    total_ms: float | None = None
    prompt: str | None = None

    def fields(self) -> dict[str, Any]:
        """The record as log fields, milliseconds rounded to µs."""
        # Read the slots directly: dataclasses.asdict deep-copies every value, which cost ~10 % of a
        # proxied request's CPU in a profile of the gateway under wrk.
        out = {name: getattr(self, name) for name in _FIELDS}
        for name in ("decision_ms", "upstream_ms", "total_ms"):
            if out[name] is not None:
                out[name] = round(out[name], 3)
        if out["prompt"] is None:
            del out["prompt"]
        return out


_FIELDS = tuple(field.name for field in dataclasses.fields(RequestRecord))


def since_ms(started: float) -> float:
    """Milliseconds since `started`, a `time.perf_counter()` reading."""
    return (time.perf_counter() - started) * 1000


def logged(endpoint: Endpoint) -> Endpoint:
    """`endpoint`, writing one line per request and answering every one with its `X-Request-Id`.

    A streamed answer (`StreamingResponse` and its kind) is logged once it has been sent, so the
    line tells how it ended (a client gone, an upstream cut short) and the whole time it took.
    """

    async def run(request: Request) -> Response:
        given = request.headers.get("x-request-id", "")
        record = RequestRecord(
            request_id=given if _REQUEST_ID.match(given) else uuid.uuid4().hex,
            method=request.method,
            path=request.url.path,
        )
        request.state.record = record
        started = time.perf_counter()

        def write() -> None:
            record.total_ms = since_ms(started)
            log.info(
                "%s %s %s %s",
                record.method,
                record.path,
                record.status,
                record.outcome,
                extra={"fields": record.fields()},
            )

        try:
            response = await endpoint(request)
        except ApiError as exc:
            record.status = exc.status
            write()
            raise
        except Exception:
            record.status, record.outcome = 500, record.outcome or "error"
            write()
            raise
        except BaseException:  # cancelled
            write()
            raise
        record.status = response.status_code
        response.headers["X-Request-Id"] = record.request_id
        if not hasattr(response, "body"):  # streamed: its end is still to come
            return _LoggedOnceSent(response, write)
        write()
        return response

    return run


class _LoggedOnceSent(Response):
    """`inner`, sent as it is, then `write` called."""

    def __init__(self, inner: Response, write: Callable[[], None]) -> None:
        self.status_code = inner.status_code
        self.raw_headers = inner.raw_headers
        self.background = None
        self._inner = inner
        self._write = write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._inner(scope, receive, send)
        finally:
            self._write()


def prompt_of(body: bytes) -> str | None:
    """The `prompt` of a JSON body, for operators who chose to log prompts; None if there is none."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    return prompt if isinstance(prompt, str) else None
