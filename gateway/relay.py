"""Relay an upstream's answer to the client as it arrives, and settle the request's charge by how it ended.

A 2xx answer sent to its end keeps the charge. A client gone before the answer was all sent, or a
body the upstream cut short, refunds it (a non-2xx answer was refunded when its status came).

A small answer of known length is read whole and sent in one piece: the fewest sends, and a body the
upstream cuts short is still a clean 502. Others stream as they arrive.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from starlette.types import Send

from gateway.config import Plan
from gateway.errors import BadGateway, asgi_headers
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
        self.record = record
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
            self.record.outcome = outcome


# Answers with a known length up to this size are read whole and sent in one piece; longer ones,
# and those of unknown length, are streamed as they arrive.
WHOLE_BODY_LIMIT = 1 << 20


class CutShort(Exception):
    """The upstream broke off its answer after the client had its head: the client's answer is cut short too."""


async def relay(answer: UpstreamAnswer, headers: Mapping[str, str], send: Send) -> None:
    """Send `answer` to the client, with `headers` (ours) in place of any the upstream sent of the same name.

    BadGateway if the upstream breaks off before anything was sent (the caller answers instead);
    CutShort if it breaks off once the head has gone out.
    """
    ours = asgi_headers(headers)
    taken = {name for name, _ in ours}
    head = [(name, value) for name, value in answer.raw_headers if name not in taken] + ours
    length = answer.content_length
    if length is not None and length <= WHOLE_BODY_LIMIT:
        body = await answer.read()
        head.append((b"content-length", str(len(body)).encode("latin-1")))
        await send({"type": "http.response.start", "status": answer.status, "headers": head})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": answer.status, "headers": head})
    try:
        async for chunk in answer.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except BadGateway as exc:
        raise CutShort(exc.message) from exc
    await send({"type": "http.response.body", "body": b"", "more_body": False})
