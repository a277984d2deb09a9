"""One proxied request, start to end: identity → plan → admission → forward → settle → metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from gateway.admission import admit
from gateway.caller import identify, peer
from gateway.cost import request_cost
from gateway.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    Forbidden,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    error_response,
)
from gateway.forward import upstream_headers
from gateway.metrics import NO_PLAN
from gateway.relay import Charge, Relay
from gateway.requestlog import RequestRecord, prompt_of, since_ms
from limits import DailyQuota, Decision, LimitsError

if TYPE_CHECKING:
    from gateway.app import Services

# The status nginx logs for "the client closed the connection before the answer"; no one reads it.
CLIENT_CLOSED = 499

log = logging.getLogger("quotagate.proxy")


async def proxy(request: Request) -> Response:
    """Decide the request against its plan and, if admitted, forward it; refund what fails."""
    services: Services = request.app.state.services
    config = services.config
    route = config.routes.get(request.url.path)
    if route is None:
        return error_response(NotFound(f"No route for {request.method} {request.url.path}."))
    record: RequestRecord = request.state.record
    record.route = route.path
    plan_label = NO_PLAN
    try:
        identity = await identify(request, services)
        record.account = identity.account
        plan = config.plan_at(identity.plan, time.time())  # a temporary override lapses by itself
        if plan is None:
            raise Forbidden(f"This account's plan {identity.plan!r} is not offered; contact support.")
        plan_label = record.plan = plan.name
        body = await _read_body(request, services.settings.max_body_bytes)
        if services.settings.log_prompts:
            record.prompt = prompt_of(body)
        record.cost = cost = request_cost(route, body)
        # Shed before the decision, so a shed request costs no quota.
        lowest = plan.priority <= config.lowest_priority
        services.shedder.check(route.upstream, config.pool(route.upstream), lowest_priority=lowest)
        idempotency_key = request.headers.get("idempotency-key")
        started = time.perf_counter()
        try:
            decision = await admit(services.store, identity, plan, cost, idempotency_key=idempotency_key)
        finally:  # refusals are decisions too
            record.decision_ms = since_ms(started)
            services.metrics.decision_seconds.observe(record.decision_ms / 1000)
    except ApiError as exc:
        record.outcome = _outcome(exc)
        services.metrics.requests.labels(plan_label, route.path, record.outcome).inc()
        if plan_label == NO_PLAN and isinstance(exc.__cause__, RedisError | LimitsError):
            services.metrics.redis_errors.labels("authenticate").inc()  # the store guard counts decide's
        return error_response(exc)
    # decision None: admitted while Redis could not decide (on_store_failure: open); nothing charged.
    if decision is not None and not decision.replayed:
        services.metrics.images_charged.labels(plan.name).inc(cost)
    if decision is not None and plan.limits.shadow_arg:  # limits in shadow mode: count what they would do
        services.metrics.shadow_requests.labels(plan.name, route.path, _shadow_outcome(decision)).inc()

    slot = services.shedder.take(route.upstream)
    services.metrics.upstream_in_flight.labels(route.upstream).set(services.shedder.in_flight(route.upstream))
    charge = Charge(services, route.path, identity, plan, decision, record, slot)
    forwarded = upstream_headers(
        request.headers,
        {
            "X-Request-Id": record.request_id,
            "X-Forwarded-For": _forwarded_for(request),
            "X-Quotagate-Priority": str(plan.priority),
            "X-Quotagate-Plan": plan.name,
            "X-Quotagate-Account": identity.account,
        },
        drop=(services.settings.account_header,),
    )
    path_qs = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    gone = asyncio.ensure_future(_client_gone(request))
    opening = asyncio.ensure_future(
        services.forwarder.open(route.upstream, config.pool(route.upstream), request.method, path_qs, forwarded, body)
    )
    started = time.perf_counter()
    try:
        await asyncio.wait({opening, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        opening.cancel()
        gone.cancel()
        await charge.end("client_gone", refund=True)
        raise
    finally:
        services.metrics.upstream_seconds.labels(route.path).observe(time.perf_counter() - started)
        record.upstream_ms = since_ms(started)
    if not opening.done():  # the client went away before the answer came
        opening.cancel()
        await asyncio.wait([opening])
        if not opening.cancelled() and opening.exception() is None:
            opening.result().finish()
        await charge.end("client_gone", refund=True)
        return Response(status_code=CLIENT_CLOSED)
    try:
        answer = opening.result()
    except BadGateway as exc:
        gone.cancel()
        await charge.end("upstream_error", refund=True)
        return error_response(exc, charge.headers)
    record.upstream_status = answer.status
    if 200 <= answer.status < 300:
        outcome = "allowed"
    else:
        # No image came back, so none is charged: 5xx, the backend's 503 (passed on with its
        # Retry-After) and its 4xx alike.
        await charge.refund()
        outcome = "upstream_error" if answer.status >= 500 else "refunded"
    record.outcome = outcome
    return Relay(answer, charge, gone, outcome)


def _shadow_outcome(decision: Decision) -> str:
    refusals = decision.shadow_refusals
    if not refusals:
        return "allowed"
    return "quota_exhausted" if any(isinstance(s.limit, DailyQuota) for s in refusals) else "rate_limited"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is over {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is over {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _forwarded_for(request: Request) -> str:
    client = peer(request) or "unknown"
    prior = request.headers.get("x-forwarded-for")
    return f"{prior}, {client}" if prior else client


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _outcome(exc: ApiError) -> str:
    match exc:
        case Overloaded():
            return "shed"
        case QuotaExceeded():
            return "quota_exhausted"
        case RateLimited():
            return "rate_limited"
        case Unauthorized() | Forbidden():
            return "unauthorized"
        case ServiceUnavailable():
            return "store_unavailable"
        case BadRequest() | PayloadTooLarge():
            return "bad_request"
        case _:
            return "upstream_error"
