"""A stand-in image service in its own process, for a test to kill: `python -m tests.reliability.stub_upstream PORT`.

It answers like the backend (400 unless the body is a JSON object with a string `prompt`; else `n` images),
and appends the headers of every request it receives, one JSON object a line, to $STUB_SEEN_FILE.
"""

from __future__ import annotations

import json
import os
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(seen_file: str | None) -> Starlette:
    """The stub; each request's headers go to `seen_file` when it is set."""
    seen = open(seen_file, "a", buffering=1) if seen_file else None  # noqa: SIM115 - open while serving

    async def images(request: Request) -> Response:
        if seen is not None:
            seen.write(json.dumps(dict(request.headers)) + "\n")
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            error = {
                "message": "`prompt` is required",
                "type": "invalid_request_error",
                "param": "prompt",
                "code": None,
            }
            return JSONResponse({"error": error}, status_code=400)
        n = body.get("n", 1) if isinstance(body.get("n"), int) else 1
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": "aW1hZ2U="}] * n})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/images/generations", images, methods=["POST"]), Route("/healthz", healthz)])


if __name__ == "__main__":
    app = create_app(os.environ.get("STUB_SEEN_FILE"))
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
