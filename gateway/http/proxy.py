"""One proxied request, start to end: identity → plan → admission → forward → settle → metrics.

This is the gateway's hot path, in plain ASGI: the app (gateway/app.py) hands every request for a
configured route straight here, past Starlette's middleware and router, which cost as much CPU as
the limiting itself.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from functools import partial

from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from gateway.admission import idempotency, jobs
from gateway.admission.cost import request_cost
from gateway.admission.decision import admit, affordable
from gateway.admission.identity import Identity
from gateway.admission.places import Held
from gateway.config.quotas import Plan, Route
from gateway.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    ConcurrencyLimited,
    Forbidden,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    RawAnswer,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
)
from gateway.http.charge import Charge
from gateway.http.disconnect import CancelOnDisconnect
from gateway.http.jobs import accepted, wants_async
from gateway.http.relay import CutShort, relay
from gateway.http.request_headers import header_fields
from gateway.http.services import Services
from gateway.observe.metrics import NO_PLAN
from gateway.observe.requestlog import RequestRecord, begin, prompt_of, since_ms, write
from gateway.upstream.forward import UpstreamAnswer, upstream_headers
from limits import DailyQuota, Decision, Lease, LimitsError, Queued

# The status nginx logs for "the client closed the connection before the answer"; no one reads it.
CLIENT_CLOSED = 499

log = logging.getLogger("quotagate.proxy")


@dataclass(slots=True)
class Incoming:
    """What the hot path reads of a request: its scope, its headers and the address of its peer."""

    scope: Scope
    receive: Receive
    headers: dict[str, str]  # lower-case names; a repeated field's values joined by ", " (RFC 9110 §5.3)
    peer: str | None

    @classmethod
    def of(cls, scope: Scope, receive: Receive) -> Incoming:
        client = scope.get("client")
        return cls(scope, receive, header_fields(scope["headers"]), client[0] if client else None)


async def proxy(services: Services, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one request for `route`, and log it once the answer has ended."""
    request = Incoming.of(scope, receive)
    record = begin(scope["method"], scope["path"], request.headers.get("x-request-id"))
    record.route = route.path
    started = time.perf_counter()
    try:
        await _proxy(services, route, request, record, send)
    except ClientDisconnect:  # while its body was still arriving
        record.status, record.outcome = CLIENT_CLOSED, "client_gone"
        services.metrics.requests.labels(record.plan or NO_PLAN, route.path, "client_gone").inc()
    except Exception:
        record.status, record.outcome = 500, record.outcome or "error"
        raise
    finally:
        write(record, started)


async def _proxy(services: Services, route: Route, request: Incoming, record: RequestRecord, send: Send) -> None:
    """Decide the request against its plan and, if admitted, forward it; refund what fails."""
    config = services.config
    plan_label = NO_PLAN
    try:
        identity = await services.caller.identify(request.headers, request.peer)
        record.account = identity.account
        # A temporary override lapses by itself; a brownout applies while the fleet's line is long.
        plan = config.plan_at(identity.plan, time.time(), services.brownouts.applied())
        if plan is None:
            raise Forbidden(f"This account's plan {identity.plan!r} is not offered; contact support.")
        plan_label = record.plan = plan.name
        key = idempotency.key_of(request.headers)
        # A request with a key may be owed the answer kept for it, which the cached refusal knows nothing of.
        exhausted = services.refusals.answer(identity.account, plan) if route.cost != 0 and key is None else None
        if exhausted is not None:  # its quota is spent until the day ends: refused first, before its body is read
            record.outcome, record.status = "quota_exhausted", exhausted.status
            services.metrics.requests.labels(plan.name, route.path, "quota_exhausted").inc()
            await exhausted.send(send, record.request_id)
            return
        lease = held = None
        try:
            # The account's own concurrent place, before the body: its stalled bodies hold only its places.
            lease = await _take_place(services, identity.account, plan)
            body = await _read_body(request, services.settings.max_body_bytes, services.settings.body_timeout)
            if services.settings.log_prompts:
                record.prompt = prompt_of(body)
            record.cost = cost = request_cost(route, body)
            bound = None if key is None else idempotency.bind(key, request.scope, body)
            # Its place in the pool, before it is decided on: a request that must wait its turn costs no quota.
            # An Idempotency-Key asks for one answer to one request: such a request is answered synchronously.
            as_job = key is None and wants_async(request.headers)
            entered = await _enter_pool(services, route, plan, identity, cost, body, as_job)
            if isinstance(entered, QueuedJob):  # accepted as an async job: the fleet runs it at its turn
                record.outcome, record.status = "queued", 202
                services.metrics.requests.labels(plan.name, route.path, "queued").inc()
                services.metrics.jobs.labels(plan.name, jobs.QUEUED).inc()
                if lease is not None:
                    services.leases.give_back(lease)
                await accepted(entered.job, entered.queued).send(send, record.request_id)
                return
            held = entered
            started = time.perf_counter()
            try:
                if held.place is None:  # Redis was not reached for its place: the plan's on_store_failure decides
                    services.store.unreachable(plan, cost)
                    decision = None
                else:
                    decision = await admit(services.store, identity, plan, cost, key=bound)
            finally:  # refusals are decisions too
                record.decision_ms = since_ms(started)
                services.metrics.decision_seconds.observe(record.decision_ms / 1000)
        except BaseException:  # refused, or gone: its places go to the next requests
            if held is not None:
                services.places.give_back(held)
            if lease is not None:
                services.leases.give_back(lease)
            raise
    except idempotency.Replayed as replayed:  # the answer kept for its key, sent again: nothing charged
        record.outcome = "replayed"
        services.metrics.requests.labels(plan_label, route.path, "replayed").inc()
        record.status = await idempotency.replay(replayed.answer, {"X-Request-Id": record.request_id}, send)
        return
    except ApiError as exc:
        record.outcome = _outcome(exc)
        services.metrics.requests.labels(plan_label, route.path, record.outcome).inc()
        if plan_label == NO_PLAN and isinstance(exc.__cause__, RedisError | LimitsError):
            services.metrics.redis_errors.labels("authenticate").inc()  # the store guard counts decide's
        await _answer_error(exc, {"X-Request-Id": record.request_id}, record, send)
        return
    # decision None: admitted while Redis could not decide (on_store_failure: open); nothing charged.
    if decision is not None and not decision.replayed:
        services.metrics.images_charged.labels(plan.name).inc(cost)
    if decision is not None and plan.limits.shadow_arg:  # limits in shadow mode: count what they would do
        services.metrics.shadow_requests.labels(plan.name, route.path, _shadow_outcome(decision)).inc()

    services.metrics.upstream_in_flight.labels(route.upstream).set(services.places.in_flight(route.upstream))
    charge = Charge(services, route.path, identity, plan, decision, record, held, lease)
    capture = None
    if decision is not None and decision.claim is not None:  # it claimed its key: its answer is kept for replays
        keep = partial(services.store.keep_answer, identity.account, decision)
        send = capture = idempotency.AnswerCapture(send, services.settings.idempotency_answer_bytes, keep)
    outcome = "client_gone"
    try:
        async with CancelOnDisconnect(request.receive) as watch:
            outcome = await _forward(services, route, request, body, identity, plan, charge, send, watch)
        if watch.gone and record.status is None:
            record.status = CLIENT_CLOSED
    finally:  # a charge not settled by the backend's answer (the server stops, or failed) is refunded
        await charge.end(outcome)
        if capture is not None:  # after any refund, which frees the key: a refunded answer is never kept
            await capture.finish()


async def _forward(
    services: Services,
    route: Route,
    request: Incoming,
    body: bytes,
    identity: Identity,
    plan: Plan,
    charge: Charge,
    send: Send,
    watch: CancelOnDisconnect,
) -> str:
    """Forward the admitted request, settle its charge by the backend's answer and relay it; the outcome to count.

    A client that hangs up before the answer withdraws its request: the backend drops it if it has not
    begun and says so, or else makes and answers it, and the charge follows that answer as it would
    for a client still there. Once the answer has begun, a hang-up cancels the relay; the charge stands.
    """
    record = charge.record
    capture = send if isinstance(send, idempotency.AnswerCapture) else None
    send = watch.sending(send)
    job = secrets.token_urlsafe(16)  # the backend's name for this request, should it be withdrawn
    forwarded = upstream_headers(
        request.headers,
        {
            "X-Request-Id": record.request_id,
            "X-Forwarded-For": _forwarded_for(request),
            "X-Quotagate-Priority": str(plan.priority),
            "X-Quotagate-Plan": plan.name,
            "X-Quotagate-Account": identity.account,
            "X-Quotagate-Job": job,
        },
        drop=(services.settings.account_header,),
    )
    query = request.scope["query_string"]
    path_qs = route.path + (f"?{query.decode('latin-1')}" if query else "")
    pool = services.config.pool(route.upstream)
    upstream = services.forwarder.upstream(route.upstream, charge.backend)
    watch.on_gone = lambda: services.forwarder.withdraw(upstream, job)
    started = time.perf_counter()
    services.capacity.started(route.upstream, upstream.url, record.cost or 0)
    status = 0
    try:
        answer = await services.forwarder.open(
            route.upstream, pool, request.scope["method"], path_qs, forwarded, body, upstream=upstream
        )
        status = answer.status
    except BadGateway as exc:
        await charge.refund("upstream_error")
        await _answer_error(exc, charge.headers, record, send)
        return "upstream_error"
    finally:
        watch.on_gone = None  # from here a hang-up cancels the relay
        took = time.perf_counter() - started
        services.metrics.upstream_seconds.labels(route.path).observe(took)
        services.capacity.finished(route.upstream, upstream.url, took, record.cost or 0, 200 <= status < 300)
        record.upstream_ms = since_ms(started)
    record.upstream_status = answer.status
    if 200 <= answer.status < 300:
        charge.keep()
    else:
        await charge.refund(_refund_reason(answer))
    if watch.gone:  # it left while the backend worked: the answer settled the charge, and goes nowhere
        await _keep_unsent(answer, charge, capture)
        return "client_gone"
    upstream_failed = False
    try:
        record.status = answer.status
        await relay(answer, charge.headers, send)
    except BadGateway as exc:  # cut short before the client had anything: answer a clean 502
        upstream_failed = True
        await charge.refund("upstream_error")
        await _answer_error(exc, charge.headers, record, send)
        return "upstream_error"
    except CutShort as exc:  # the path failed mid-answer: refunded, though the client has part of it
        upstream_failed = True
        await charge.refund("upstream_error")
        log.warning("upstream %s broke off an answer: %s", answer.upstream.url, exc)
        return "upstream_error"
    finally:
        answer.finish(upstream_failed=upstream_failed)
    if 200 <= answer.status < 300:
        return "allowed"
    return "upstream_error" if answer.status >= 500 else "refunded"


async def _keep_unsent(answer: UpstreamAnswer, charge: Charge, capture: idempotency.AnswerCapture | None) -> None:
    """Finish the answer of a client that left; one it made and paid for under an Idempotency-Key is kept for its retry.

    Reading that answer is the path to the client: a body the upstream cuts short is refunded, as it would
    be for a client still there.
    """
    failed = False
    try:
        if capture is not None and 200 <= answer.status < 300:
            try:
                body = await answer.read()
            except BadGateway:
                failed = True
                await charge.refund("upstream_error")
                return
            await capture.keep_unsent(answer.status, answer.raw_headers, body)
    finally:
        answer.finish(upstream_failed=failed)


def _refund_reason(answer: UpstreamAnswer) -> str:
    """Why a non-2xx answer is refunded: withdrawn unbegun, refused (4xx, the backend's 503 "busy"), or failed."""
    if answer.withdrawn:
        return "withdrawn"
    return "upstream_error" if answer.status >= 500 and answer.status != 503 else "refused"


async def _answer_error(exc: ApiError, headers: dict[str, str], record: RequestRecord, send: Send) -> None:
    record.status = exc.status
    await RawAnswer.of(exc, headers).send(send)


def _shadow_outcome(decision: Decision) -> str:
    refusals = decision.shadow_refusals
    if not refusals:
        return "allowed"
    return "quota_exhausted" if any(isinstance(s.limit, DailyQuota) for s in refusals) else "rate_limited"


@dataclass(frozen=True, slots=True)
class QueuedJob:
    job: jobs.Job
    queued: Queued


async def _enter_pool(
    services: Services, route: Route, plan: Plan, identity: Identity, cost: int, body: bytes, as_job: bool
) -> Held | QueuedJob:
    """The request's place in its pool; with `as_job`, its job's ticket in the line when there is none now.

    Raises the 503 that tells it its turn when it must come back, and (as a job) the refusal its quota would
    give now: a job is charged when it starts, so what it could not afford now is not queued.
    """
    config = services.config
    if not as_job:
        entered = await services.places.enter(config, route.upstream, plan, identity.account, cost)
        assert not isinstance(entered, Queued)
        return entered
    await affordable(services.store, identity, plan, cost)
    job = jobs.Job(
        id=jobs.new_job_id(),
        account=identity.account,
        plan=plan.name,
        route=route.path,
        pool=route.upstream,
        images=cost,
        body=body,
        status=jobs.QUEUED,
        created=time.time(),
        told_wait=0.0,
    )
    await services.jobs.create(job)  # before its ticket: a replica that claims the ticket finds the job
    try:
        entered = await services.places.enter(config, route.upstream, plan, identity.account, cost, job=job.id)
    except BaseException:
        await services.jobs.delete(job.id)
        raise
    if not isinstance(entered, Queued):  # a place is free now: answered at once, as without the preference
        await services.jobs.delete(job.id)
        return entered
    await services.jobs.told(job.id, entered.wait)
    return QueuedJob(job, entered)


async def _take_place(services: Services, account: str, plan: Plan) -> Lease | None:
    """The account's lease on one of its plan's concurrent places; None if the plan sets no limit.

    If Redis cannot say, the request goes on without one: the decision that follows meets the same
    Redis, and the plan's `on_store_failure` answers for both.
    """
    if plan.concurrency is None:
        return None
    try:
        lease = await services.leases.take(account, plan.concurrency)
    except LimitsError:
        return None
    if lease is None:
        raise ConcurrencyLimited(
            f"This account already has {plan.concurrency} requests in progress, the most the {plan.name} plan "
            "allows at once; retry when one has finished.",
            headers={"Retry-After": "1"},
        )
    return lease


async def _read_body(request: Incoming, limit: int, within: float) -> bytes:
    """The whole body; RequestTimeout past `within` seconds, PayloadTooLarge past `limit` bytes, ClientDisconnect."""
    try:
        async with asyncio.timeout(within):
            return await _receive_body(request, limit)
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {within:g} s.") from None


async def _receive_body(request: Incoming, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is over {limit} bytes.")
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is over {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _forwarded_for(request: Incoming) -> str:
    client = request.peer or "unknown"
    prior = request.headers.get("x-forwarded-for")
    return f"{prior}, {client}" if prior else client


def _outcome(exc: ApiError) -> str:
    match exc:
        case Overloaded():
            return "shed"
        case QuotaExceeded():
            return "quota_exhausted"
        case RateLimited():
            return "rate_limited"
        case _ if isinstance(exc, idempotency.REFUSED):
            return "idempotency_refused"
        case Unauthorized() | Forbidden():
            return "unauthorized"
        case ServiceUnavailable():
            return "store_unavailable"
        case BadRequest() | PayloadTooLarge():
            return "bad_request"
        case RequestTimeout():
            return "body_timeout"
        case ConcurrencyLimited():
            return "concurrency_limited"
        case _:
            return "upstream_error"
