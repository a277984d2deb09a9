"""The HTTP surface: OpenAI-style image generation, models, capacity, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from backend.batcher import Batcher, BatcherSettings, Runner
from backend.capacity import CAPACITY_HEADER, Capacity
from backend.errors import (
    BackendError,
    BodyTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    ModelUnavailable,
    NotFound,
    NotReady,
    Overloaded,
    Withdrawn,
    error_response,
)
from backend.metrics import BackendMetrics
from backend.openapi import describe
from backend.validation import RequestLimits, parse_generation, parse_priority
from backend.withdrawals import JOB_HEADER, Withdrawals

__all__ = ["PRIORITY_HEADER", "BackendState", "ServeSettings", "create_app"]

PRIORITY_HEADER = "X-Quotagate-Priority"
logger = logging.getLogger("backend")

# Builds the model runner; called once, on the inference thread.
Loader = Callable[[], Runner]


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    limits: RequestLimits
    batcher: BatcherSettings = field(default_factory=BatcherSettings)
    # None leaves torch's choice; tests fix it because results differ between thread counts.
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.limits.max_n > self.batcher.max_queue_images:
            raise ValueError("max_n must not exceed max_queue_images, or such requests could never be queued")


@dataclass
class BackendState:
    """What the routes reach through app.state.backend; filled in by the lifespan."""

    settings: ServeSettings
    metrics: BackendMetrics
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once loading has ended, whether the model became ready or failed.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    batcher: Batcher | None = None
    load_error: str | None = None
    withdrawals: Withdrawals = field(default_factory=Withdrawals)


def _capacity(state: BackendState) -> Capacity:
    batcher = state.batcher
    return Capacity(
        slots=state.settings.batcher.max_batch_images,
        queue_images=state.settings.batcher.max_queue_images,
        queued_images=batcher.queued_images if batcher is not None else 0,
        running_images=batcher.running_images if batcher is not None else 0,
        images_per_s=batcher.throughput.images_per_s if batcher is not None else 0.0,
        ready=state.ready.is_set(),
    )


def _init_inference_thread(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


async def _start(
    state: BackendState,
    load: Loader,
    executor: ThreadPoolExecutor,
    clock: Callable[[], float],
    on_load_failure: Callable[[str], None] | None,
) -> None:
    loop = asyncio.get_running_loop()
    settings = state.settings
    try:
        runner = await loop.run_in_executor(executor, load)
        limits = settings.limits
        await loop.run_in_executor(executor, runner, ["warm-up"], [0], limits.default_size, limits.default_steps, 0)
        logger.info("model loaded and warmed")
    except Exception as exc:
        if isinstance(exc, ModelUnavailable):
            logger.error("cannot start the model: %s", exc)
        else:
            logger.exception("cannot start the model")
        state.load_error = str(exc)
        state.settled.set()
        if on_load_failure is not None:
            on_load_failure(state.load_error)
        return
    state.batcher = Batcher(runner, executor, state.metrics, settings.batcher, clock=clock)
    state.ready.set()
    state.settled.set()
    await state.batcher.run()


def _state(request: Request) -> BackendState:
    state: BackendState = request.app.state.backend
    return state


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _rejection_reason(exc: BackendError) -> str | None:
    if isinstance(exc, NotReady):
        return "not_ready"
    if isinstance(exc, BodyTooLarge):
        return "too_large"
    if isinstance(exc, InvalidRequest):
        return "invalid"
    # The batcher counts its own refusals (queue_full, queue_wait).
    return None


async def generations(request: Request) -> Response:
    """Every answer, refusals included, tells the caller the capacity as it stands when the answer leaves."""
    response = await _generate(request)
    response.headers[CAPACITY_HEADER] = _capacity(_state(request)).header_value()
    return response


async def _generate(request: Request) -> Response:
    state = _state(request)
    limits = state.settings.limits
    try:
        body = await _read_body(request, limits.max_body_bytes)
        if state.batcher is None:
            raise NotReady()
        job_request = parse_generation(body, limits, priority=parse_priority(request.headers.get(PRIORITY_HEADER)))
        token = request.headers.get(JOB_HEADER)
        if token is not None and state.withdrawals.withdrawn_early(token):
            state.metrics.withdrawn.inc()
            raise Withdrawn()
        job = state.batcher.submit(job_request)
    except ClientDisconnect:
        return Response(status_code=499)
    except BackendError as exc:
        reason = _rejection_reason(exc)
        if reason is not None:
            state.metrics.rejections.labels(reason=reason).inc()
        return error_response(exc)

    # While queued, watch the connection: a client that leaves is dropped and costs no inference.
    watcher: asyncio.Future[Any] = asyncio.ensure_future(_until_disconnect(request.receive))
    if token is not None:
        state.withdrawals.track(token, job)
    try:
        await asyncio.wait([job.future, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if token is not None:
            state.withdrawals.forget(token)
        # Also reached when this handler itself is cancelled: never leave an orphan in the queue.
        left = not job.future.done()
        if left:
            state.batcher.cancel(job)
    if left:
        return Response(status_code=499)
    if job.future.cancelled():
        # The worker stopped (shutdown) before this job ran.
        return error_response(Overloaded("The server is shutting down.", reason="shutting_down", retry_after_s=1))
    try:
        pngs = job.future.result()
    except Withdrawn as exc:
        return error_response(exc)
    except BackendError as exc:
        logger.error("generation failed", exc_info=exc.__cause__)
        return error_response(exc)
    data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
    return JSONResponse({"created": int(time.time()), "data": data})


async def withdraw(request: Request) -> Response:
    """Withdraw a queued request by its job token: 200 if it will never start, 409 if it already has."""
    state = _state(request)
    batcher = state.batcher
    token = request.path_params["token"]
    if state.withdrawals.withdraw(token, batcher.withdraw if batcher is not None else lambda job: False):
        return JSONResponse({"withdrawn": True})
    return JSONResponse({"withdrawn": False, "started": True}, status_code=409)


async def models(request: Request) -> Response:
    model_id = _state(request).settings.limits.model_id
    entry = {"id": model_id, "object": "model", "created": 0, "owned_by": "quotagate"}
    return JSONResponse({"object": "list", "data": [entry]})


async def capacity(request: Request) -> Response:
    return JSONResponse(_capacity(_state(request)).as_json())


async def openapi(request: Request) -> Response:
    return JSONResponse(describe(_state(request).settings.limits))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = _state(request)
    if state.ready.is_set():
        return JSONResponse({"status": "ready"})
    body: dict[str, Any] = {"status": "failed" if state.load_error else "loading"}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}."))
    if exc.status_code == 404:
        return error_response(NotFound(f"No route {request.url.path}."))
    return error_response(BackendError(str(exc.detail)))


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(BackendError("Internal server error."))


def create_app(
    settings: ServeSettings,
    load: Loader,
    *,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_load_failure: Callable[[str], None] | None = None,
) -> Starlette:
    """The backend app; `load` builds the model runner on the inference thread during the lifespan.

    Loading runs in the background: /healthz answers at once, /readyz says 503 until the model is warm.
    If loading fails, /readyz keeps saying why and `on_load_failure` (the CLI stops the server) is called.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = BackendState(settings=settings, metrics=BackendMetrics(registry or CollectorRegistry()))
        app.state.backend = state
        executor = ThreadPoolExecutor(
            1,
            thread_name_prefix="inference",
            initializer=_init_inference_thread,
            initargs=(settings.torch_threads,),
        )
        task = asyncio.create_task(_start(state, load, executor, clock, on_load_failure))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            executor.shutdown(wait=True, cancel_futures=True)

    routes = [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/jobs/{token}", withdraw, methods=["DELETE"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/capacity", capacity, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
