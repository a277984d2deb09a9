"""The gateway's public API as an OpenAPI 3.1 document, served at /openapi.json.

Static on purpose: the API is OpenAI's Images API, which the gateway does not define but passes on,
plus its own errors. Clients and fuzzers (schemathesis, in tests/reliability) read it.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_GENERATION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 1000},
        "n": {"type": "integer", "minimum": 1, "maximum": 10, "description": "images, each charged against the plan"},
        "size": {"type": "string", "example": "256x256"},
        "response_format": {"type": "string", "enum": ["b64_json", "url"]},
        "model": {"type": "string"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295},
        "steps": {"type": "integer", "minimum": 1},
        "user": {"type": "string"},
    },
}

_IMAGES = {
    "type": "object",
    "required": ["created", "data"],
    "properties": {
        "created": {"type": "integer"},
        "data": {"type": "array", "items": {"type": "object", "properties": {"b64_json": {"type": "string"}}}},
    },
}

_JOB = {
    "type": "object",
    "required": ["id", "object", "status", "created"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "image.job"},
        "status": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
        "created": {"type": "integer"},
        "position": {"type": "integer", "description": "while queued: 1 is next"},
        "eta_s": {"type": "number", "description": "while queued: seconds until its turn"},
        "result": {"$ref": "#/components/schemas/Images"},
        "error": {"type": ["object", "null"]},
        "status_code": {"type": "integer"},
    },
}


def _job_answer(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}},
    }


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "quotagate",
        "version": "1",
        "description": "OpenAI's Images API behind per-plan daily quotas and rate limits. Refused requests are "
        "never charged; a failed generation is refunded.",
    },
    "components": {
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "qg_<id>_<secret>"}},
        "schemas": {"Error": _ERROR, "GenerationRequest": _GENERATION_REQUEST, "Images": _IMAGES, "Job": _JOB},
    },
    "paths": {
        "/v1/images/generations": {
            "post": {
                "operationId": "createImage",
                "security": [{"apiKey": []}],
                "parameters": [
                    {
                        "name": "Prefer",
                        "in": "header",
                        "schema": {"type": "string", "example": "respond-async"},
                        "description": "respond-async: with no place now, 202 and a job rather than 503 and a turn",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerationRequest"}}},
                },
                "responses": {
                    "200": {
                        "description": "the images; charged",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Images"}}},
                    },
                    "202": _job_answer("with Prefer: respond-async and no place now: the job, at Location"),
                    "400": _error("the body is not a request the service accepts; refunded or never charged"),
                    "401": _error("missing, malformed, unknown or revoked API key"),
                    "403": _error("the account's plan is not offered"),
                    "411": _error("the body was sent chunked; send it with a Content-Length"),
                    "413": _error("the body is over the configured size"),
                    "429": _error("a daily quota is spent or a rate limit is reached; see Retry-After"),
                    "502": _error("the image service failed; refunded"),
                    "503": _error(
                        "no place now: Retry-After is the request's turn in line (Quotagate-Line: its position), "
                        "kept for its account; or the quota store or the image service is unavailable"
                    ),
                },
            }
        },
        "/v1/images/jobs/{job_id}": {
            "get": {
                "operationId": "getImageJob",
                "security": [{"apiKey": []}],
                "parameters": [_JOB_ID],
                "responses": {
                    "200": _job_answer("how the job stands; the images once done"),
                    "401": _error("missing, malformed, unknown or revoked API key"),
                    "404": _error("no such job for this account"),
                    "503": _error("the job store is unavailable; see Retry-After"),
                },
            },
            "delete": {
                "operationId": "cancelImageJob",
                "security": [{"apiKey": []}],
                "parameters": [_JOB_ID],
                "responses": {
                    "200": _job_answer("cancelled before it started (never charged), or its result forgotten"),
                    "401": _error("missing, malformed, unknown or revoked API key"),
                    "404": _error("no such job for this account"),
                    "409": _error("the job has started; it can no longer be cancelled"),
                    "503": _error("the job store is unavailable; see Retry-After"),
                },
            },
        },
        "/v1/quota": {
            "get": {
                "operationId": "getQuota",
                "security": [{"apiKey": []}],
                "responses": {
                    "200": {
                        "description": "the caller's plan and, per limit, what is used and left and when it resets",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "401": _error("missing, malformed, unknown or revoked API key"),
                    "403": _error("the account's plan is not offered"),
                    "411": _error("the request was sent with a chunked body; send it with a Content-Length"),
                    "429": _error("too many failed authentications from this address; see Retry-After"),
                    "503": _error("the quota store is unavailable; see Retry-After"),
                },
            }
        },
        "/healthz": {"get": {"operationId": "health", "responses": {"200": {"description": "the process is up"}}}},
        "/readyz": {
            "get": {
                "operationId": "ready",
                "responses": {"200": {"description": "Redis answers"}, "503": {"description": "Redis does not"}},
            }
        },
    },
}


async def openapi_endpoint(request: Request) -> Response:
    return JSONResponse(DOCUMENT)
