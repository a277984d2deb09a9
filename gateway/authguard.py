"""Failed authentications per client address: past a rate, the address is refused for a while.

Each failure is charged to a token bucket in Redis (through the engine), so every replica counts
the same failures; only failures cost a round trip. Once the bucket refuses, the replica that saw
it refuses the address locally until the bucket would admit again: while blocked, no request from
it is looked up at all, even one with a good key (a flood of junk keys costs Redis nothing).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from gateway.errors import RateLimited
from gateway.storefailure import CircuitBreaker
from limits import Bucket, Engine, LimitsError, LimitSet, StoreUnavailable

log = logging.getLogger("quotagate.authguard")


class FailedAuthGuard:
    """Blocks addresses that fail to authenticate more than `per_minute` times a minute (0: never)."""

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

    def check(self, address: str) -> None:
        """Raise RateLimited if `address` is blocked here."""
        until = self._blocked.get(address)
        if until is None:
            return
        wait = until - self._clock()
        if wait <= 0:
            del self._blocked[address]
            return
        raise _blocked(wait)

    async def failed(self, address: str, *, now: float | None = None) -> RateLimited | None:
        """Count one failure of `address`; the refusal to answer instead if it is now blocked."""
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


def _blocked(wait: float) -> RateLimited:
    seconds = max(1, math.ceil(wait))
    return RateLimited(
        f"Too many failed authentications from your address; retry in {seconds} s.",
        headers={"Retry-After": str(seconds)},
    )
