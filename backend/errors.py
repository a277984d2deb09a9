"""Backend errors, and the one place that turns them into OpenAI-shaped JSON responses.

BackendError                      500 server_error        (base; anything unexpected maps here too)
├── InvalidRequest                400 invalid_request_error
│   └── BodyTooLarge              413 invalid_request_error
├── NotFound                      404 invalid_request_error
├── MethodNotAllowed              405 invalid_request_error
├── Overloaded                    503 server_overloaded   (+ Retry-After; reason: queue_full | queue_wait)
├── NotReady                      503 server_overloaded   (+ Retry-After; model still loading or warming)
├── InferenceFailed               500 server_error        (the pipeline raised; the cause is chained)
├── Withdrawn                     409 withdrawn           (+ X-Quotagate-Withdrawn: 1; left the queue unstarted)
└── ModelUnavailable              start-up only: the model path cannot be served (the CLI exits 2)
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# On the answer to a request withdrawn before it started: the gateway refunds it as never begun.
WITHDRAWN_HEADER = "X-Quotagate-Withdrawn"

__all__ = [
    "WITHDRAWN_HEADER",
    "BackendError",
    "BodyTooLarge",
    "InferenceFailed",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelUnavailable",
    "NotFound",
    "NotReady",
    "Overloaded",
    "Withdrawn",
    "error_response",
]


class BackendError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(BackendError):
    status_code = 400
    error_type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status_code = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body is larger than {limit} bytes.", code="body_too_large")


class NotFound(BackendError):
    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowed(BackendError):
    status_code = 405
    error_type = "invalid_request_error"


class Overloaded(BackendError):
    status_code = 503
    error_type = "server_overloaded"

    def __init__(self, message: str, *, reason: str, retry_after_s: int) -> None:
        super().__init__(message, code=reason)
        self.reason = reason
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class NotReady(Overloaded):
    def __init__(self) -> None:
        super().__init__("The model is still loading; retry shortly.", reason="not_ready", retry_after_s=1)


class InferenceFailed(BackendError):
    def __init__(self) -> None:
        super().__init__("Image generation failed on the server.", code="inference_failed")


class Withdrawn(BackendError):
    """The gateway withdrew the request while it was queued: no image was begun for it."""

    status_code = 409
    error_type = "withdrawn"

    def __init__(self) -> None:
        super().__init__("The request was withdrawn before its generation began.", code="withdrawn")

    def headers(self) -> dict[str, str]:
        return {WITHDRAWN_HEADER: "1"}


class ModelUnavailable(BackendError):
    pass


def error_response(exc: BackendError) -> JSONResponse:
    """The OpenAI error body for `exc`, with its status and headers."""
    body = {
        "error": {
            "message": exc.message,
            "type": exc.error_type,
            "param": exc.param,
            "code": exc.code,
        }
    }
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers())
