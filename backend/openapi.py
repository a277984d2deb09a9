"""The backend's HTTP API as an OpenAPI 3.1 document built from what it serves, at /openapi.json.

Sizes, `n`, steps and the model id come from the running server's limits, so a generated request
that the document calls valid is one the server accepts. Fuzzers (schemathesis, in tests/reliability)
read it.
"""

from __future__ import annotations

from typing import Any

from backend.validation import MAX_SEED, RequestLimits, format_size

__all__ = ["describe"]

_ERROR = {
    "description": "an OpenAI-shaped error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "object", "required": ["message", "type"]}},
            }
        }
    },
}

_CAPACITY = {
    "description": "what this backend can take and how fast it drains",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["slots", "queue_images", "queued_images", "running_images", "images_per_s", "ready"],
                "properties": {
                    "slots": {"type": "integer", "minimum": 1},
                    "queue_images": {"type": "integer", "minimum": 1},
                    "queued_images": {"type": "integer", "minimum": 0},
                    "running_images": {"type": "integer", "minimum": 0},
                    "images_per_s": {"type": "number", "minimum": 0},
                    "ready": {"type": "boolean"},
                },
            }
        }
    },
}


def describe(limits: RequestLimits) -> dict[str, Any]:
    """The OpenAPI document for a server with these limits."""
    request = {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars, "pattern": r"\S"},
            "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n},
            "size": {"type": "string", "enum": [format_size(size) for size in limits.sizes]},
            "steps": {"type": "integer", "minimum": 1, "maximum": limits.max_steps},
            "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
            "response_format": {"type": "string", "enum": ["b64_json"]},
            "model": {"type": "string", "enum": [limits.model_id]},
            "user": {"type": "string"},
        },
    }
    json_ok = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "quotagate-backend", "version": "1", "description": "OpenAI's Images API on one model."},
        "paths": {
            "/v1/images/generations": {
                "post": {
                    "operationId": "createImage",
                    "parameters": [
                        {
                            "name": "X-Quotagate-Priority",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "set by the gateway: the plan's priority (higher first)",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": request}},
                    },
                    "responses": {"200": json_ok, "400": _ERROR, "413": _ERROR, "503": _ERROR},
                }
            },
            "/v1/models": {"get": {"operationId": "listModels", "responses": {"200": json_ok}}},
            "/v1/capacity": {"get": {"operationId": "getCapacity", "responses": {"200": _CAPACITY}}},
            "/healthz": {"get": {"operationId": "health", "responses": {"200": json_ok}}},
            "/readyz": {"get": {"operationId": "ready", "responses": {"200": json_ok, "503": _ERROR}}},
        },
    }
