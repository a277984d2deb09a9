"""An upstream that never finishes its answer, run as its own process so a test can kill it mid-request.

`python -m tests.gateway.doomed_upstream PORT hold`: reads the request, prints `arrived`, never answers.
`... PORT split`: answers 200, sends the head of a JSON body, prints `sent`, never sends the rest.
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def app(mode: str) -> Starlette:
    async def images(request: Request) -> Response:
        await request.body()
        if mode == "hold":
            print("arrived", flush=True)
            await asyncio.Event().wait()

        async def body():  # type: ignore[no-untyped-def]
            yield b'{"created": 1, "data": ['
            print("sent", flush=True)
            await asyncio.Event().wait()

        return StreamingResponse(body(), media_type="application/json")

    return Starlette(routes=[Route("/v1/images/generations", images, methods=["POST"])])


if __name__ == "__main__":
    port, mode = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(app(mode), host="127.0.0.1", port=port, log_level="error")
