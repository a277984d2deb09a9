"""An image service that advertises whatever a test tells it and behaves as it is told, as a process of its own.

`python -m tests.adversarial.lying_backend PORT` serves:
- `POST /v1/images/generations`: counts the request's `n` images as held, waits for its gate, then answers as
  its mode says: `ok` (200 with `n` images of `image_bytes` base64 characters each) or `fail` (500). Past
  `hold_limit` images held it answers 503 at once (it is full, whatever it advertised) and counts a refusal.
- `GET /v1/capacity`: the text of `advertise`, as is (a JSON reading, or anything else), with status 200.
- `POST /control`: a JSON object with any of `advertise` (text), `hold_limit`, `mode`, `image_bytes`, `gate`
  (`open` or `closed`), `release` (a number: let
  that many of the held requests answer, oldest first, the gate staying closed for the rest).
- `GET /stats`: images held now, the most ever held at once, images answered 200, 500s and 503s given,
  and the accounts in the order their requests arrived.
- `DELETE /v1/jobs/{job}`: a withdrawal, answered 404 (it withdraws nothing).

It stands for a third-party or broken image service: one that lies about its capacity, or says nothing sane.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HONEST = {"slots": 1, "queue_images": 0, "queued_images": 0, "running_images": 0, "images_per_s": 1.0, "ready": True}


def lying_backend() -> Starlette:
    gate = asyncio.Event()
    gate.set()
    waiting: list[asyncio.Event] = []  # one per held request, oldest first: `release` opens them one by one
    control: dict[str, Any] = {"advertise": json.dumps(HONEST), "hold_limit": 1, "mode": "ok", "image_bytes": 8}
    stats: dict[str, Any] = {"held": 0, "most_held": 0, "answered": 0, "failed": 0, "refused": 0, "arrivals": []}

    async def generate(request: Request) -> Response:
        body = await request.json()
        images = int(body.get("n", 1))
        if stats["held"] + images > control["hold_limit"]:
            stats["refused"] += 1
            error = {"message": "busy", "type": "server_error", "param": None, "code": "overloaded"}
            return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": "1"})
        stats["arrivals"].append(request.headers.get("x-quotagate-account", ""))
        stats["held"] += images
        stats["most_held"] = max(stats["most_held"], stats["held"])
        mine = asyncio.Event()
        waiting.append(mine)
        try:
            if not await _opened_or_gone(gate, mine, request):
                return Response(status_code=499)
        finally:
            waiting.remove(mine)
            stats["held"] -= images
        if control["mode"] == "fail":
            stats["failed"] += images
            error = {"message": "the model crashed", "type": "server_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=500)
        stats["answered"] += images
        image = "A" * int(control["image_bytes"])
        return JSONResponse({"created": 0, "data": [{"b64_json": image}] * images})

    async def capacity(request: Request) -> Response:
        return Response(str(control["advertise"]), media_type="application/json")

    async def steer(request: Request) -> Response:
        wanted = await request.json()
        if "gate" in wanted:
            gate.set() if wanted.pop("gate") == "open" else gate.clear()
        for released in waiting[: int(wanted.pop("release", 0))]:
            released.set()
        control.update(wanted)
        return JSONResponse({**control, "gate": "open" if gate.is_set() else "closed"})

    async def read_stats(request: Request) -> Response:
        return JSONResponse(stats)

    async def withdraw(request: Request) -> Response:
        return JSONResponse({"error": {"message": "no such job"}}, status_code=404)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/images/generations", generate, methods=["POST"]),
            Route("/v1/capacity", capacity),
            Route("/control", steer, methods=["POST"]),
            Route("/stats", read_stats),
            Route("/v1/jobs/{job}", withdraw, methods=["DELETE"]),
            Route("/healthz", healthz),
        ]
    )


async def _opened_or_gone(gate: asyncio.Event, mine: asyncio.Event, request: Request) -> bool:
    """Wait for the gate or this request's own release; False if the client hangs up first (the body is read:
    receive waits for a disconnect)."""
    opened = {asyncio.ensure_future(gate.wait()), asyncio.ensure_future(mine.wait())}
    gone = asyncio.ensure_future(request.receive())
    done, pending = await asyncio.wait({*opened, gone}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return gone not in done


if __name__ == "__main__":
    uvicorn.run(lying_backend(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
