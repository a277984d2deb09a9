"""One log line per proxied request: who, which plan and route, what was decided, and how long each step took.

The proxy fills a `RequestRecord` as it learns each fact and writes it once the answer has ended, so
the line tells how it ended (a client gone, an upstream cut short) and the whole time it took;
`logged` does the same for the Starlette endpoints. API keys are never recorded, and a prompt only when the
operator asks for it (`QUOTAGATE_LOG_PROMPTS=1`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import ApiError
from gateway.observe.logs import direct_handler

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

    def message(self) -> str:
        """The line's message: `POST /v1/images/generations 200 allowed`."""
        return f"{self.method} {self.path} {self.status} {self.outcome}"

    def fields(self) -> dict[str, Any]:
        """The record as log fields, milliseconds rounded to µs."""
        # Spelled out, not dataclasses.asdict (its deep copies were ~10 % of a request's CPU).
        out = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "account": self.account,
            "plan": self.plan,
            "outcome": self.outcome,
            "cost": self.cost,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "decision_ms": _rounded(self.decision_ms),
            "upstream_ms": _rounded(self.upstream_ms),
            "total_ms": _rounded(self.total_ms),
        }
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)


def since_ms(started: float) -> float:
    """Milliseconds since `started`, a `time.perf_counter()` reading."""
    return (time.perf_counter() - started) * 1000


def begin(method: str, path: str, given_request_id: str | None) -> RequestRecord:
    """The record of a request just arrived: the client's X-Request-Id if it is a fit one, else a new one."""
    request_id = given_request_id if given_request_id and _REQUEST_ID.match(given_request_id) else os.urandom(16).hex()
    return RequestRecord(request_id=request_id, method=method, path=path)


def write(record: RequestRecord, started: float) -> None:
    """Log `record`'s line, its total time counted from `started` (a `time.perf_counter()` reading)."""
    record.total_ms = since_ms(started)
    handler = direct_handler(log)
    if handler is not None:
        handler.write_later(log.name, record)  # formatted later, with the lines around it
        return
    if not log.isEnabledFor(logging.INFO):
        return
    # Another handler is in place (tests' caplog): makeRecord + handle rather than log.info, which
    # walks the stack for the caller's file and line (~7 µs), which this line does not print.
    line = log.makeRecord(
        log.name,
        logging.INFO,
        __file__,
        0,
        record.message(),
        (),
        None,
        extra={"fields": record.fields()},
    )
    log.handle(line)


def logged(endpoint: Endpoint) -> Endpoint:
    """`endpoint`, writing one line per request and answering every one with its `X-Request-Id`."""

    async def run(request: Request) -> Response:
        record = begin(request.method, request.url.path, request.headers.get("x-request-id"))
        request.state.record = record
        started = time.perf_counter()
        try:
            response = await endpoint(request)
        except ApiError as exc:
            record.status = exc.status
            write(record, started)
            raise
        except Exception:
            record.status, record.outcome = 500, record.outcome or "error"
            write(record, started)
            raise
        except BaseException:  # cancelled
            write(record, started)
            raise
        record.status = response.status_code
        response.headers["X-Request-Id"] = record.request_id
        write(record, started)
        return response

    return run


def prompt_of(body: bytes) -> str | None:
    """The `prompt` of a JSON body, for operators who chose to log prompts; None if there is none."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    return prompt if isinstance(prompt, str) else None
