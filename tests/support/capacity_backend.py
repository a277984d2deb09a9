"""An image service of fixed capacity that advertises it and counts what it holds, as a process of its own.

`python -m tests.support.capacity_backend PORT SLOTS QUEUE [RATE]` serves:
- `POST /v1/images/generations` (or `/v1/images/edits`, for a second route): holds the request's `n` images until
  its gate is open, then answers 200 like the backend. Past SLOTS + QUEUE images held it answers 503 (and counts
  it: a gateway that keeps the fleet bound never sees one).
- `GET /v1/capacity`: what it can hold, as the real backend advertises it, with RATE images per second.
- `GET /stats`: images held now, the most ever held at once, images answered, 503s given, and the accounts
  in the order their requests arrived.
- `POST /gate/close`, `POST /gate/open`: hold every answer from now on, or let them all go.
- `DELETE /v1/jobs/{job}`: a withdrawal, answered 404 (it withdraws nothing).
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

IMAGE = "aW1hZ2U="


def capacity_backend(slots: int, queue: int, rate: float) -> Starlette:
    gate = asyncio.Event()
    gate.set()
    stats = {"held": 0, "most_held": 0, "answered": 0, "refused": 0, "arrivals": []}

    async def generate(request: Request) -> Response:
        body = await request.json()
        images = int(body.get("n", 1))
        if stats["held"] + images > slots + queue:  # type: ignore[operator]
            stats["refused"] += 1  # type: ignore[operator]
            error = {"message": "busy", "type": "server_error", "param": None, "code": "overloaded"}
            return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": "1"})
        stats["arrivals"].append(request.headers.get("x-quotagate-account", ""))  # type: ignore[union-attr]
        stats["held"] += images  # type: ignore[operator]
        stats["most_held"] = max(stats["most_held"], stats["held"])  # type: ignore[type-var]
        try:
            if not await _opened_or_gone(gate, request):
                return Response(status_code=499)  # its client left: dropped, as the backend drops queued work
        finally:
            stats["held"] -= images  # type: ignore[operator]
        stats["answered"] += images  # type: ignore[operator]
        return JSONResponse({"created": 0, "data": [{"b64_json": IMAGE}] * images})

    async def capacity(request: Request) -> Response:
        held = int(stats["held"])  # type: ignore[call-overload]
        return JSONResponse(
            {
                "slots": slots,
                "queue_images": queue,
                "queued_images": max(0, held - slots),
                "running_images": min(held, slots),
                "images_per_s": rate,
                "ready": True,
            }
        )

    async def read_stats(request: Request) -> Response:
        return JSONResponse(stats)

    async def close(request: Request) -> Response:
        gate.clear()
        return JSONResponse({"gate": "closed"})

    async def open_(request: Request) -> Response:
        gate.set()
        return JSONResponse({"gate": "open"})

    async def withdraw(request: Request) -> Response:
        return JSONResponse({"error": {"message": "no such job"}}, status_code=404)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/images/generations", generate, methods=["POST"]),
            Route("/v1/images/edits", generate, methods=["POST"]),
            Route("/v1/capacity", capacity),
            Route("/stats", read_stats),
            Route("/gate/close", close, methods=["POST"]),
            Route("/gate/open", open_, methods=["POST"]),
            Route("/v1/jobs/{job}", withdraw, methods=["DELETE"]),
            Route("/healthz", healthz),
        ]
    )


async def _opened_or_gone(gate: asyncio.Event, request: Request) -> bool:
    """Wait for the gate; False if the client hangs up first (the body is read: receive waits for a disconnect)."""
    opened = asyncio.ensure_future(gate.wait())
    gone = asyncio.ensure_future(request.receive())
    done, pending = await asyncio.wait({opened, gone}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return opened in done


if __name__ == "__main__":
    port, slots, queue = (int(a) for a in sys.argv[1:4])
    rate = float(sys.argv[4]) if len(sys.argv) > 4 else 10.0
    uvicorn.run(capacity_backend(slots, queue, rate), host="127.0.0.1", port=port, log_level="warning")
