"""The reference servers the gateway is measured against, as uvicorn factories.

`uvicorn --factory --app-dir bench servers:bare_app` answers JSON and does nothing else: the ceiling of
any Starlette app on this machine. `servers:passthrough_app` forwards every request to
$BENCH_UPSTREAM over one aiohttp session, with no identity and no limiting: what proxying alone costs
(the reference the overhead targets are set against). `servers:client_passthrough_app` does the same
over the gateway's own client (gateway/upstream/client.py): beside the gateway, what its limiting
costs on top of the same proxying.
`servers:capacity_app` is the surge's image service: a fixed number
of images at a time, highest priority first, a bounded queue, advertised at `GET /v1/capacity` as the
real backend does, and what it held at `GET /bench/stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config.settings import Settings
from gateway.upstream.client import UPSTREAM_KEEPALIVE_S, Origin, UpstreamClient
from limits.coalesce import Coalescer, Script
from limits.endpoint import Endpoint
from limits.store import connect

ANSWER = {"created": 0, "data": [{"b64_json": "aW1hZ2U="}]}
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "host", "content-length"})


def bare_app() -> Starlette:
    """Reads the body and answers a fixed JSON image list."""

    async def answer(request: Request) -> Response:
        await request.body()
        return JSONResponse(ANSWER)

    return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])


def passthrough_app() -> Starlette:
    """Forwards method, path, headers and body to $BENCH_UPSTREAM and relays the answer whole."""
    upstream = os.environ["BENCH_UPSTREAM"].rstrip("/")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The gateway's timeouts and keep-alive, and none of aiohttp's extras a proxy does without.
        app.state.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                sock_connect=Settings.upstream_connect_timeout, sock_read=Settings.upstream_read_timeout
            ),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
        )
        yield
        await app.state.session.close()

    async def forward(request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        session: aiohttp.ClientSession = request.app.state.session
        async with session.request(request.method, upstream + request.url.path, headers=headers, data=body) as answer:
            content = await answer.read()
            relayed = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
            return Response(content, answer.status, headers=relayed)

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])], lifespan=lifespan)


def client_passthrough_app() -> Starlette:
    """`passthrough_app` over the gateway's own upstream client rather than aiohttp's."""
    origin = Origin.parse(os.environ["BENCH_UPSTREAM"])

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.client = UpstreamClient(
            connect_timeout=Settings.upstream_connect_timeout, read_timeout=Settings.upstream_read_timeout
        )
        yield
        await app.state.client.close()

    async def forward(request: Request) -> Response:
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.items() if k not in _HOP_BY_HOP]
        client: UpstreamClient = request.app.state.client
        answer = await client.send(origin, request.method, request.url.path, headers, body)
        try:
            content = await answer.read()
        finally:
            answer.release()
        relayed = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in answer.headers
            if k.lower().decode("latin-1") not in _HOP_BY_HOP
        }
        return Response(content, answer.status, headers=relayed)

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])], lifespan=lifespan)


def round_trip_passthrough_app() -> Starlette:
    """`client_passthrough_app` that first makes one Redis call ($BENCH_REDIS) and waits for its reply.

    The call goes through the gateway's own coalescer (limits/coalesce.py), as a decision does, but
    runs a script that only answers 1: proxying plus the one round trip that an exact, shared
    decision needs, with no limiting. The gateway against it is what the limiting's own work costs.
    """
    passthrough = client_passthrough_app()
    forward = passthrough.routes[0].endpoint  # type: ignore[attr-defined]
    answer_one = Script("return 1")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = connect(os.environ["BENCH_REDIS"])
        app.state.redis = Coalescer(Endpoint.of(redis))
        async with passthrough.router.lifespan_context(app):
            yield
        await app.state.redis.aclose()
        await redis.aclose()

    async def decide_then_forward(request: Request) -> Response:
        await request.app.state.redis.call(answer_one, [], [])
        return await forward(request)

    return Starlette(routes=[Route("/{path:path}", decide_then_forward, methods=["GET", "POST"])], lifespan=lifespan)


class PrioritySlots:
    """`slots` places; a freed place goes to the waiting request of highest priority (first come within one).

    It also keeps the seconds all its places were taken (`busy_s`): a freed place handed straight to a
    waiter never counts as free.
    """

    def __init__(self, slots: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._free = slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap of (-priority, arrival, waiter)
        self._arrivals = itertools.count()
        self._clock = clock
        self._busy_since: float | None = None
        self._busy_s = 0.0

    def busy_s(self) -> float:
        """Seconds so far during which every place was taken."""
        ongoing = 0.0 if self._busy_since is None else self._clock() - self._busy_since
        return self._busy_s + ongoing

    async def acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiting:
            self._take()
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (-priority, next(self._arrivals), waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a place just as it was cancelled
                self.release()
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, waiter = heapq.heappop(self._waiting)
            if not waiter.done():
                waiter.set_result(None)
                return
        if self._free == 0 and self._busy_since is not None:
            self._busy_s += self._clock() - self._busy_since
            self._busy_since = None
        self._free += 1

    def _take(self) -> None:
        self._free -= 1
        if self._free == 0:
            self._busy_since = self._clock()


class DrainMeter:
    """Images per second the service drains while busy: `slots` over the seconds an image really took (an
    exponentially weighted mean), the nominal rate until the first image is done."""

    def __init__(self, slots: int, nominal: float, *, weight: float = 0.05) -> None:
        self._slots = slots
        self._weight = weight
        self.images_per_s = nominal

    def observe(self, images: int, seconds: float) -> None:
        if images > 0 and seconds > 0:
            self.images_per_s += self._weight * (self._slots * images / seconds - self.images_per_s)


def capacity_app() -> Starlette:
    """An image service of fixed capacity that advertises it, as the real backend (backend/app.py) does.

    $BENCH_SLOTS images at a time, $BENCH_SERVICE_MS each (± $BENCH_JITTER of it, drawn evenly), and
    $BENCH_QUEUE images waiting: `GET /v1/capacity` says so, with the drain rate it measures. Past
    SLOTS + QUEUE images held it answers 503 with Retry-After, or, with $BENCH_OVERFLOW=hold, holds them
    too (so that what a gateway sends past the capacity shows in what it holds). A freed place goes to the
    highest X-Quotagate-Priority waiting, as the real backend does (which also ages waiting requests so
    the lowest are not starved; a bench run is too short to need it), and a request whose client leaves
    before its images start is dropped, as the real backend drops withdrawn work.

    `GET /bench/stats` tells what it held: images now, the most ever at once (and when, in seconds since
    the epoch), seconds all its slots were taken, images made, requests refused and dropped; with
    `?jobs=1` also when each async job (`X-Quotagate-Job`) reached it, in seconds since the epoch.
    """
    slot_count = int(os.environ.get("BENCH_SLOTS", "4"))
    service_s = float(os.environ.get("BENCH_SERVICE_MS", "20")) / 1000
    jitter = float(os.environ.get("BENCH_JITTER", "0"))
    queue_images = int(os.environ.get("BENCH_QUEUE", "64"))
    hold_overflow = os.environ.get("BENCH_OVERFLOW", "refuse") == "hold"
    slots = PrioritySlots(slot_count)
    drain = DrainMeter(slot_count, slot_count / service_s)
    draw = random.Random(os.getpid())
    stats: dict[str, Any] = {
        "slots": slot_count,
        "capacity": slot_count + queue_images,
        "held": 0,
        "running": 0,
        "most_held": 0,
        "most_held_at": 0.0,
        "made": 0,
        "refused": 0,
        "dropped": 0,
    }
    job_arrivals: dict[str, float] = {}

    async def generate(request: Request) -> Response:
        body = await request.json()
        images = int(body.get("n", 1))
        if stats["held"] + images > stats["capacity"] and not hold_overflow:
            stats["refused"] += 1
            error = {"message": "overloaded", "type": "server_error", "param": None, "code": "overloaded"}
            return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": "1"})
        job = request.headers.get("x-quotagate-job")
        if job:
            job_arrivals[job] = time.time()
        stats["held"] += images
        if stats["held"] > stats["most_held"]:
            stats["most_held"], stats["most_held_at"] = stats["held"], time.time()
        try:
            if not await _place_or_gone(slots, int(request.headers.get("x-quotagate-priority", "0")), request):
                stats["dropped"] += 1
                return Response(status_code=499)
            stats["running"] += 1
            began = time.monotonic()
            try:
                await asyncio.sleep(service_s * images * (1 + jitter * (2 * draw.random() - 1)))
            finally:
                stats["running"] -= 1
                slots.release()
            drain.observe(images, time.monotonic() - began)
        finally:
            stats["held"] -= images
        stats["made"] += images
        return JSONResponse(ANSWER)

    async def capacity(request: Request) -> Response:
        return JSONResponse(
            {
                "slots": slot_count,
                "queue_images": queue_images,
                "queued_images": max(0, stats["held"] - stats["running"]),
                "running_images": stats["running"],
                "images_per_s": round(drain.images_per_s, 3),
                "ready": True,
            }
        )

    async def read_stats(request: Request) -> Response:
        answer = {**stats, "busy_s": slots.busy_s(), "images_per_s": drain.images_per_s}
        if request.query_params.get("jobs"):
            answer["jobs"] = job_arrivals
        return JSONResponse(answer)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/images/generations", generate, methods=["POST"]),
            Route("/v1/capacity", capacity),
            Route("/bench/stats", read_stats),
            Route("/healthz", healthz),
        ]
    )


async def _place_or_gone(slots: PrioritySlots, priority: int, request: Request) -> bool:
    """Wait for a slot; False (holding none) if the client hangs up first (the body is read: receive waits for
    its disconnect)."""
    place = asyncio.ensure_future(slots.acquire(priority))
    gone = asyncio.ensure_future(request.receive())
    done, _ = await asyncio.wait({place, gone}, return_when=asyncio.FIRST_COMPLETED)
    if place in done:
        gone.cancel()
        return True
    place.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await place  # a place handed over as it was cancelled is given back by acquire
    return False
