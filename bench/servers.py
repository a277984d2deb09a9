"""The reference servers the gateway is measured against, as uvicorn factories.

`uvicorn --factory --app-dir bench servers:bare_app` answers JSON and does nothing else: the ceiling of
any Starlette app on this machine. `servers:passthrough_app` forwards every request to
$BENCH_UPSTREAM over one aiohttp session, with no identity and no limiting: what proxying alone costs
(the reference the overhead targets are set against). `servers:client_passthrough_app` does the same
over the gateway's own client (gateway/upstream/client.py): beside the gateway, what its limiting
costs on top of the same proxying.
`servers:capacity_app` is the surge's image service: a fixed number
of images at a time, highest priority first, a bounded queue, 503 past it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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
    """`slots` places; a freed place goes to the waiting request of highest priority (first come within one)."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap of (-priority, arrival, waiter)
        self._arrivals = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
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
        self._free += 1


def capacity_app() -> Starlette:
    """An image service of fixed capacity: $BENCH_SLOTS images at a time, $BENCH_SERVICE_MS each; over
    $BENCH_QUEUE waiting requests it answers 503 with Retry-After. As the real backend (backend/batcher.py)
    does, a freed place goes to the highest X-Quotagate-Priority waiting (the backend also ages waiting
    requests, so the lowest are not starved; a bench run is too short to need it)."""
    slots = PrioritySlots(int(os.environ.get("BENCH_SLOTS", "4")))
    service_s = float(os.environ.get("BENCH_SERVICE_MS", "20")) / 1000
    queue_limit = int(os.environ.get("BENCH_QUEUE", "64"))
    waiting = 0

    async def generate(request: Request) -> Response:
        nonlocal waiting
        body = await request.json()
        if waiting >= queue_limit:
            error = {"message": "overloaded", "type": "server_error", "param": None, "code": "overloaded"}
            return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": "1"})
        priority = int(request.headers.get("x-quotagate-priority", "0"))
        waiting += 1
        try:
            await slots.acquire(priority)
            try:
                await asyncio.sleep(service_s * int(body.get("n", 1)))
            finally:
                slots.release()
        finally:
            waiting -= 1
        return JSONResponse(ANSWER)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"]), Route("/healthz", healthz)])
