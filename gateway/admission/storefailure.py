"""When Redis cannot decide: stop waiting on it, and let each plan choose to admit or refuse.

A circuit breaker opens after `failures` Redis calls in a row fail and refuses every call for
`open_for` seconds; then one call goes through as a probe, and its answer closes the breaker or
opens it again. So a dead or hung Redis costs each request nothing, and the gateway recovers by
itself when Redis is back.

Meanwhile a plan with `on_store_failure: open` admits requests, each charged against a small
token bucket of its own in this process (`store_failure_budget`, shared by all the plan's
accounts on this replica); one with `closed` is refused with 503 and `Retry-After`. What was
admitted so is never charged in Redis, and not refunded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from gateway.config.quotas import Plan
from gateway.errors import ServiceUnavailable
from gateway.observe.metrics import GatewayMetrics
from limits import Bucket, Decision, Engine, LimitsError, StoreUnavailable

log = logging.getLogger("quotagate.store")


class CircuitBreaker:
    """Closed → (`failures` in a row) → open for `open_for` s → one probe → closed or open again."""

    def __init__(
        self,
        *,
        failures: int = 5,
        open_for: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self._threshold = failures
        self._open_for = open_for
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._probe_at: float | None = None  # when the probe now in flight was let through

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def retry_after(self) -> float:
        """Seconds until the breaker lets a probe through (0 if closed)."""
        if self._opened_at is None:
            return 0.0
        return max(self._opened_at + self._open_for - self._clock(), 0.0)

    def allow(self) -> bool:
        """True if a Redis call may be made now."""
        if self._opened_at is None:
            return True
        now = self._clock()
        if now < self._opened_at + self._open_for:
            return False
        # One probe at a time; a probe that never reports (its request was cancelled) is replaced
        # after another `open_for`.
        if self._probe_at is not None and now < self._probe_at + self._open_for:
            return False
        self._probe_at = now
        return True

    def succeeded(self) -> None:
        """A Redis call answered."""
        self._failures = 0
        if self._opened_at is not None:
            self._opened_at = self._probe_at = None
            log.warning("redis answers again: circuit closed")
            self._on_change(False)

    def failed(self) -> None:
        """A Redis call failed (connection refused or lost, or no answer in time)."""
        self._failures += 1
        if self._opened_at is not None:  # the probe failed: stay open for another spell
            self._opened_at, self._probe_at = self._clock(), None
        elif self._failures >= self._threshold:
            self._opened_at = self._clock()
            log.error(
                "redis failed %d calls in a row: circuit open for %.1f s at a time", self._failures, self._open_for
            )
            self._on_change(True)


class LocalBudget:
    """Per-plan token buckets in this process (GCRA on a monotonic clock), for fail-open admissions."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[tuple[str, Bucket], float] = {}  # keyed by the bucket too: a reload starts it afresh

    def take(self, plan: str, bucket: Bucket, cost: int) -> float:
        """Take `cost` units: 0.0 if taken, else the seconds until they could be (inf: never)."""
        if cost > bucket.burst:
            return math.inf
        now = self._clock()
        interval = bucket.period / bucket.rate
        tat = max(self._tat.get((plan, bucket), now), now)
        allow_at = tat + cost * interval - bucket.burst * interval
        if allow_at > now:
            return allow_at - now
        self._tat[(plan, bucket)] = tat + cost * interval
        return 0.0


class StoreGuard:
    """Engine calls behind the breaker, and each plan's on_store_failure when they cannot be made."""

    def __init__(self, engine: Engine, metrics: GatewayMetrics, breaker: CircuitBreaker, budget: LocalBudget) -> None:
        self._engine = engine
        self._metrics = metrics
        self.breaker = breaker
        self._budget = budget

    async def decide(
        self, account: str, plan: Plan, cost: int, *, idempotency_key: str | None = None, fingerprint: str = ""
    ) -> Decision | None:
        """The engine's decision; None if Redis could not decide and the plan admits without it.

        Raises ServiceUnavailable (503 with Retry-After) when the plan refuses without Redis.
        Other engine errors (ClockSkew) propagate.
        """
        if self.breaker.allow():
            try:
                decision = await self._engine.decide(
                    account, plan.limits, cost, idempotency_key=idempotency_key, fingerprint=fingerprint
                )
            except StoreUnavailable as exc:
                self.breaker.failed()
                self._metrics.redis_errors.labels("decide").inc()
                self._without_store(plan, cost, exc)
                return None
            self.breaker.succeeded()
            return decision
        self._without_store(plan, cost, None)
        return None

    async def usage(self, account: str, plan: Plan) -> tuple[Decision, dict[str, int]]:
        """The engine's `usage` behind the breaker; ServiceUnavailable if Redis cannot answer."""
        if self.breaker.allow():
            try:
                answer = await self._engine.usage(account, plan.limits)
            except StoreUnavailable as exc:
                self.breaker.failed()
                self._metrics.redis_errors.labels("decide").inc()
                raise self._unavailable() from exc
            self.breaker.succeeded()
            return answer
        raise self._unavailable()

    def _unavailable(self) -> ServiceUnavailable:
        wait = max(self.breaker.retry_after(), 1.0)
        return ServiceUnavailable(
            "The quota service is unavailable; retry shortly.", headers={"Retry-After": str(math.ceil(wait))}
        )

    async def refund(self, account: str, plan: Plan, decision: Decision) -> bool:
        """Give back what `decision` took; False if Redis could not be reached (the images stay charged)."""
        return await self._give_back(lambda: self._engine.refund(account, plan.limits, decision))

    def refund_of(self, account: str, decision: Decision) -> str | None:
        """What refunding `decision` takes, as text to keep (an async job's record), or None if it took nothing."""
        return self._engine.refund_of(account, decision)

    async def refund_later(self, refund: str) -> bool:
        """Give back what `refund_of` described; False if Redis could not be reached (it stays charged)."""
        return await self._give_back(lambda: self._engine.refund_later(refund))

    async def _give_back(self, refund: Callable[[], Awaitable[None]]) -> bool:
        if not self.breaker.allow():
            self._metrics.redis_errors.labels("refund").inc()
            return False
        try:
            await refund()
        except LimitsError as exc:
            if isinstance(exc, StoreUnavailable):
                self.breaker.failed()
            self._metrics.redis_errors.labels("refund").inc()
            return False
        self.breaker.succeeded()
        return True

    async def keep_answer(self, account: str, decision: Decision, answer: bytes | None) -> bool:
        """End the idempotency key `decision` claimed, keeping `answer`; False if nothing was written.

        Unwritten (Redis unreachable), the key stays in flight until its lease ends, then is free again.
        """
        if not self.breaker.allow():
            self._metrics.redis_errors.labels("keep_answer").inc()
            return False
        try:
            kept = await self._engine.keep_answer(account, decision, answer)
        except LimitsError as exc:
            if isinstance(exc, StoreUnavailable):
                self.breaker.failed()
            self._metrics.redis_errors.labels("keep_answer").inc()
            return False
        self.breaker.succeeded()
        return kept

    def unreachable(self, plan: Plan, cost: int) -> None:
        """Decide without Redis, which this request already failed to reach: the plan's `on_store_failure`.

        So a hung Redis costs one request one timeout at most, not one per call it would make.
        """
        self._without_store(plan, cost, None)

    def _without_store(self, plan: Plan, cost: int, cause: StoreUnavailable | None) -> None:
        """Admit within the plan's local budget if it fails open, else raise ServiceUnavailable."""
        budget = plan.store_failure_budget
        wait = max(self.breaker.retry_after(), 1.0)
        if budget is not None:
            short = self._budget.take(plan.name, budget, cost)
            if short == 0.0:
                self._metrics.store_failures.labels(plan.name, "allowed").inc()
                return
            wait = max(wait, short) if short != math.inf else wait
        self._metrics.store_failures.labels(plan.name, "denied").inc()
        raise ServiceUnavailable(
            "The quota service is unavailable; retry shortly.", headers={"Retry-After": str(math.ceil(wait))}
        ) from cause
