"""Every error the gateway raises, and the one place that turns them into HTTP answers.

ConfigError                  the quota YAML was refused: "file:line: field: problem"
ApiError                     an answer to the client, with an OpenAI-shaped JSON body
 ├── BadRequest              400 invalid_request_error: bad JSON, a bad field
 │    └── LengthRequired      411 length_required: a chunked request body (only Content-Length is taken)
 ├── Unauthorized            401 invalid_api_key: missing, malformed, unknown or revoked key
 ├── Forbidden               403 permission_error: the account's plan is not configured
 ├── NotFound                404 not_found: no route for the path
 ├── RequestTimeout          408 request_timeout: the body did not arrive within the deadline
 ├── PayloadTooLarge         413 invalid_request_error: body over the configured size
 ├── IdempotencyKeyInFlight  409 idempotency_key_in_flight: the key's first request has not ended
 ├── IdempotencyKeyReused    422 idempotency_key_reused: the key was used for another request
 │    ├── IdempotencyAnswerNotKept  422 idempotency_answer_not_kept: served, but its answer was not kept
 │    └── IdempotencyAnswerExpired  422 idempotency_answer_expired: served, and its kept answer has expired
 ├── QuotaExceeded           429 insufficient_quota: a daily quota is spent
 ├── RateLimited             429 rate_limit_exceeded: a token bucket is empty
 ├── ConcurrencyLimited      429 concurrency_limit_exceeded: the account has its plan's requests in flight
 ├── BadGateway              502 upstream_error: the backend failed or could not be reached
 └── ServiceUnavailable      503 service_unavailable: the quota store is down, or overload
      └── Overloaded          503 overloaded: shed by the gateway, lowest priority first
limits.LimitsError           raised by the engine; answered as ServiceUnavailable
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send


class ConfigError(Exception):
    """The quota config was refused; the message reads `file:line: field: problem`."""


class ApiError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    status, type = 400, "invalid_request_error"


class LengthRequired(BadRequest):
    status, code = 411, "length_required"


class Unauthorized(ApiError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(ApiError):
    status, type = 403, "permission_error"


class NotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "not_found"


class RequestTimeout(ApiError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class PayloadTooLarge(ApiError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class IdempotencyKeyInFlight(ApiError):
    status, type, code = 409, "invalid_request_error", "idempotency_key_in_flight"


class IdempotencyKeyReused(ApiError):
    status, type, code = 422, "invalid_request_error", "idempotency_key_reused"


class IdempotencyAnswerNotKept(IdempotencyKeyReused):
    code = "idempotency_answer_not_kept"


class IdempotencyAnswerExpired(IdempotencyKeyReused):
    code = "idempotency_answer_expired"


class JobStarted(ApiError):
    status, type, code = 409, "invalid_request_error", "job_started"


class QuotaExceeded(ApiError):
    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class RateLimited(ApiError):
    status, type, code = 429, "requests", "rate_limit_exceeded"


class ConcurrencyLimited(ApiError):
    status, type, code = 429, "requests", "concurrency_limit_exceeded"


class BadGateway(ApiError):
    status, type, code = 502, "server_error", "upstream_error"


class ServiceUnavailable(ApiError):
    status, type, code = 503, "server_error", "service_unavailable"


class Overloaded(ServiceUnavailable):
    code = "overloaded"


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def error_body(exc: ApiError) -> bytes:
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI's API answers errors."""
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    return _ENCODER.encode(body).encode()


def error_response(exc: ApiError, extra_headers: Mapping[str, str] | None = None) -> Response:
    """The JSON answer for `exc`, for Starlette endpoints."""
    headers = {**(extra_headers or {}), **exc.headers}
    return Response(error_body(exc), status_code=exc.status, headers=headers, media_type="application/json")


def asgi_headers(fields: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """`fields` as an ASGI answer carries them: lower-case names and values, in latin-1 bytes."""
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in fields.items()]


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """An error answer rendered for plain ASGI (the proxy's hot path), as `error_response` renders it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @classmethod
    def of(cls, exc: ApiError, extra_headers: Mapping[str, str] | None = None) -> RawAnswer:
        body = error_body(exc)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("latin-1"))]
        headers += asgi_headers({**(extra_headers or {}), **exc.headers})
        return cls(exc.status, headers, body)

    async def send(self, send: Send, request_id: str | None = None) -> None:
        """Send it, with an `X-Request-Id` field if `request_id` is given."""
        headers = self.headers if request_id is None else [*self.headers, (b"x-request-id", request_id.encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


async def handle_api_error(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: every ApiError that escapes a route becomes its JSON answer."""
    assert isinstance(exc, ApiError)
    return error_response(exc)
