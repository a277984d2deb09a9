"""Settle an admitted request's charge by how it ended, and give back its place in the pool.

The charging rule: an image is charged once the backend begins it, and a 2xx answer says it did. The
charge is refunded only when the backend or the path to it failed (no answer, a timeout, a 5xx, a body
the upstream cut short, even mid-answer), when the backend took no work (its 4xx or 503), or when the
request was withdrawn before the backend began (its 409 `withdrawn`). A client that hangs up after the
backend began is charged, whether or not its answer had started.
"""

from __future__ import annotations

import logging

from gateway.admission.identity import Identity
from gateway.admission.places import Held
from gateway.admission.ratelimit_headers import rate_limit_headers
from gateway.config.quotas import Plan
from gateway.http.services import Services
from gateway.observe.requestlog import RequestRecord
from limits import Decision, Lease

log = logging.getLogger("quotagate.charge")


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
        held: Held,  # its place in the pool
        lease: Lease
        | None = None,  # the account's concurrent place (gateway/admission/concurrency.py), if its plan has one
    ) -> None:
        limit_headers = rate_limit_headers(plan.limits, decision) if decision is not None else {}
        self.headers = {**limit_headers, "X-Request-Id": record.request_id}
        self._services = services
        self._route = route
        self._identity = identity
        self._plan = plan
        self._decision = decision
        self.record = record
        self._held = held
        self.backend = held.backend  # where its place is: the backend it is forwarded to
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
            services, pool = self._services, self._held.pool
            services.places.give_back(self._held)
            if self._lease is not None:
                services.leases.give_back(self._lease)
            services.metrics.upstream_in_flight.labels(pool).set(services.places.in_flight(pool))
            services.metrics.upstream_healthy.labels(pool).set(services.forwarder.healthy(pool))
            services.metrics.in_flight.labels(self._plan.name).dec()
            services.metrics.requests.labels(self._plan.name, self._route, outcome).inc()
            self.record.outcome = outcome
