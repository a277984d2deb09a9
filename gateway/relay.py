"""Relay an upstream's answer to the client as it arrives, and settle the request's charge by how it ended.

The charging rule: an image is charged once the backend begins it, and a 2xx answer says it did. The
charge is refunded only when the backend or the path to it failed (no answer, a timeout, a 5xx, a body
the upstream cut short, even mid-answer), when the backend took no work (its 4xx or 503), or when the
request was withdrawn before the backend began (its 409 `withdrawn`). A client that hangs up after the
backend began is charged, whether or not its answer had started.

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
from limits import Decision, Lease

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
        lease: Lease | None = None,  # the account's concurrent place (gateway/concurrency.py), if its plan has one
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
        self._lease = lease
        self._refunded = self._kept = self._ended = False
        services.metrics.in_flight.labels(plan.name).inc()

    def keep(self) -> None:
        """The backend began the images (it answered 2xx): the charge stands, whatever the client does now."""
        self._kept = True

    async def refund(self, reason: str) -> None:
        """Give the images back (once), for `reason`: upstream_error, refused or withdrawn (REFUND_REASONS)."""
        decision = self._decision
        if self._refunded or decision is None:
            return
        self._refunded = True
        if not await self._services.store.refund(self._identity.account, self._plan, decision):
            log.error("refund of %d images failed for plan %s: redis unavailable", decision.cost, self._plan.name)
            return
        if decision.allowed and not decision.replayed:
            self._services.metrics.images_refunded.labels(self._plan.name, reason).inc(decision.cost)

    async def end(self, outcome: str) -> None:
        """The request is over: free its place in the pool and count its outcome.

        A charge neither kept nor refunded by now stopped before the backend's answer was known (the
        gateway is stopping, or failed): refunded, as a failure of the path to the backend.
        """
        if self._ended:
            return
        self._ended = True
        try:
            if not self._kept:
                await self.refund("upstream_error")
        finally:
            services, pool = self._services, self._slot.pool
            self._slot.release()
            if self._lease is not None:
                services.leases.give_back(self._lease)
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
