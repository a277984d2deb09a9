"""Failed authentications per client address: past a rate, the address's failures are answered 429.

Each failure is charged to a token bucket in Redis (through the engine), so every replica counts
the same failures; only failures cost a round trip. Once the bucket refuses, the replica that saw
it answers every further failure from that address with 429 at once, without charging Redis again,
until the bucket would admit again.

Only failures are refused. A request is authenticated first, and only a credential that failed is
held against its address: a valid key is never refused because others behind the same address (a
NAT, a load balancer) failed. That gives a guesser nothing: the secret half of a key is 192 random
bits, compared in constant time against an HMAC, so no rate of guessing, blocked or not, finds one;
what the guard bounds is the cost of noise, one engine call per failure until an address is blocked
and none after. A well-formed key whose id is not cached still costs one lookup while blocked.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from gateway.admission.storefailure import CircuitBreaker
from gateway.errors import RateLimited
from limits import Bucket, Engine, LimitsError, LimitSet, StoreUnavailable

log = logging.getLogger("quotagate.authguard")


class FailedAuthGuard:
    """Refuses the failures of addresses that fail more than `per_minute` times a minute (0: never)."""

    def __init__(
        self,
        engine: Engine,
        per_minute: int,
        *,
        breaker: CircuitBreaker | None = None,
        size: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._breaker = breaker or CircuitBreaker()
        self._limits = (
            LimitSet(
                buckets=(
                    Bucket(name="auth-failures", counter="authfail", rate=per_minute, period=60, burst=per_minute),
                )
            )
            if per_minute > 0
            else None
        )
        self._size = size
        self._clock = clock
        self._blocked: dict[str, float] = {}  # address → blocked until (clock)

    async def failed(self, address: str, *, now: float | None = None) -> RateLimited | None:
        """Count one failure of `address`; the refusal to answer instead if it is blocked (then nothing is counted)."""
        blocked = self._blocked_for(address)
        if blocked is not None:
            return blocked
        # While Redis is failing, failures go uncounted rather than each waiting on a dead Redis.
        if self._limits is None or not self._breaker.allow():
            return None
        try:
            decision = await self._engine.decide(f"ip:{address}", self._limits, 1, now=now)
        except LimitsError as exc:
            if isinstance(exc, StoreUnavailable):
                self._breaker.failed()
            log.warning("could not count a failed authentication (%s)", exc)
            return None
        self._breaker.succeeded()
        wait = decision.retry_after
        if decision.allowed or wait is None:
            return None
        if len(self._blocked) >= self._size:
            self._blocked.pop(next(iter(self._blocked)))
        self._blocked[address] = self._clock() + wait
        return _blocked(wait)

    def _blocked_for(self, address: str) -> RateLimited | None:
        """The refusal for `address` if it is blocked here now."""
        until = self._blocked.get(address)
        if until is None:
            return None
        wait = until - self._clock()
        if wait <= 0:
            del self._blocked[address]
            return None
        return _blocked(wait)


def _blocked(wait: float) -> RateLimited:
    seconds = max(1, math.ceil(wait))
    return RateLimited(
        f"Too many failed authentications from your address; retry in {seconds} s.",
        headers={"Retry-After": str(seconds)},
    )
