"""An image service whose answers a test steers by the prompt: to see what a client's hang-up is charged.

`big`: a 16 MiB answer at once (the gateway streams it). `held`: begun at once, answered only once the test
posts /control/release; a withdrawal then finds it started (409). `cut`: a 16 MiB answer broken off halfway.
"""

from __future__ import annotations

import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

BIG = 16 << 20  # more than loopback's socket buffers hold: a client that stops reading stops the answer


class ChargingUpstream:
    def __init__(self) -> None:
        self.begun = 0
        self.withdrawals = 0
        self.released = asyncio.Event()

    def app(self) -> Starlette:
        async def images(request: Request) -> Response:
            prompt = json.loads(await request.body())["prompt"]
            if prompt == "held":
                self.begun += 1
                await self.released.wait()
                return JSONResponse({"created": 0, "data": [{"b64_json": "aW1hZ2U="}]})
            return JSONResponse({"created": 0, "data": [{"b64_json": "A" * BIG}]})

        async def withdraw(request: Request) -> Response:
            self.withdrawals += 1
            return JSONResponse({"withdrawn": False, "started": True}, status_code=409)

        async def control(request: Request) -> Response:
            self.released.set()
            return JSONResponse({"begun": self.begun, "withdrawals": self.withdrawals})

        async def state(request: Request) -> Response:
            return JSONResponse({"begun": self.begun, "withdrawals": self.withdrawals})

        app = Starlette(
            routes=[
                Route("/v1/jobs/{token}", withdraw, methods=["DELETE"]),
                Route("/control/release", control, methods=["POST"]),
                Route("/control/state", state, methods=["GET"]),
            ]
        )
        routed = Route("/v1/images/generations", images, methods=["POST"])

        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == "/v1/images/generations":
                body = await _body(receive)
                if json.loads(body)["prompt"] == "cut":
                    head = [(b"content-type", b"application/json"), (b"content-length", str(BIG).encode())]
                    await send({"type": "http.response.start", "status": 200, "headers": head})
                    await send({"type": "http.response.body", "body": b"x" * (BIG // 2), "more_body": True})
                    raise ConnectionAbortedError("broken off on purpose")
                replay = _replaying(receive, body)
                await routed.handle(scope, replay, send)
                return
            await app(scope, receive, send)

        return asgi  # type: ignore[return-value]


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(receive: Receive, body: bytes) -> Receive:
    sent = False

    async def again() -> dict[str, object]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again  # type: ignore[return-value]
