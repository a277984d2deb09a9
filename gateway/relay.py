"""Relay an upstream's answer to the client as it arrives, and settle the request's charge by how it ended.

A 2xx answer sent to its end keeps the charge. A client gone before the answer was all sent, or a
body the upstream cut short, refunds it (a non-2xx answer was refunded when its status came).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.config import Plan
from gateway.errors import BadGateway
from gateway.forward import UpstreamAnswer
from gateway.headers import rate_limit_headers
from gateway.identity import Identity
from gateway.requestlog import RequestRecord
from gateway.shedding import Slot
from limits import Decision

if TYPE_CHECKING:
    from gateway.app import Services

log = logging.getLogger("quotagate.relay")


class Charge:
    """An admitted request's charge and its place in the pool: refunded at most once, ended once."""

    def __init__(
        self,
        services: Services,
        route: str,
        identity: Identity,
        plan: Plan,
        decision: Decision | None,  # None: admitted while Redis could not decide; nothing was charged
        record: RequestRecord,
        slot: Slot,
    ) -> None:
        limit_headers = rate_limit_headers(plan.limits, decision) if decision is not None else {}
        self.headers = {**limit_headers, "X-Request-Id": record.request_id}
        self._services = services
        self._route = route
        self._identity = identity
        self._plan = plan
        self._decision = decision
        self._record = record
        self._slot = slot
        self._refunded = self._ended = False
        services.metrics.in_flight.labels(plan.name).inc()

    async def refund(self) -> None:
        """Give the images back (once): no image reached the client."""
        decision = self._decision
        if self._refunded or decision is None:
            return
        self._refunded = True
        if not await self._services.store.refund(self._identity.account, self._plan, decision):
            log.error("refund of %d images failed for plan %s: redis unavailable", decision.cost, self._plan.name)
            return
        if decision.allowed and not decision.replayed:
            self._services.metrics.images_refunded.labels(self._plan.name).inc(decision.cost)

    async def end(self, outcome: str, *, refund: bool = False) -> None:
        """The request is over: refund if asked, free its place in the pool, count its outcome."""
        if self._ended:
            return
        self._ended = True
        try:
            if refund:
                await self.refund()
        finally:
            services, pool = self._services, self._slot.pool
            self._slot.release()
            services.metrics.upstream_in_flight.labels(pool).set(services.shedder.in_flight(pool))
            services.metrics.upstream_healthy.labels(pool).set(services.forwarder.healthy(pool))
            services.metrics.in_flight.labels(self._plan.name).dec()
            services.metrics.requests.labels(self._plan.name, self._route, outcome).inc()
            self._record.outcome = outcome


class Relay(Response):
    """Streams `answer` to the client while watching for it to go away; settles `charge` at the end."""

    def __init__(self, answer: UpstreamAnswer, charge: Charge, gone: asyncio.Future[None], outcome: str) -> None:
        self.status_code = answer.status
        self.background = None
        self.init_headers(charge.headers)
        ours = {name for name, _ in self.raw_headers}
        upstream = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
        self.raw_headers[:0] = [(k, v) for k, v in upstream if k not in ours]
        self._answer = answer
        self._charge = charge
        self._gone = gone
        self._outcome = outcome

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._stream(send))
        outcome, refund, upstream_failed = "client_gone", True, False
        try:
            await asyncio.wait({streaming, self._gone}, return_when=asyncio.FIRST_COMPLETED)
            if not streaming.done():  # the client went away first
                streaming.cancel()
                await asyncio.wait([streaming])
            elif (error := streaming.exception()) is None:
                outcome, refund = self._outcome, False
            elif isinstance(error, BadGateway):
                log.warning("upstream %s broke off an answer: %s", self._answer.upstream.url, error.message)
                outcome, upstream_failed = "upstream_error", True
            elif not isinstance(error, OSError):  # OSError: the client's socket failed, so it is gone
                raise error
        finally:
            streaming.cancel()
            self._gone.cancel()
            self._answer.finish(upstream_failed=upstream_failed)
            await self._charge.end(outcome, refund=refund)

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._answer.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
