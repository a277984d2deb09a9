"""Load shedding while Redis cannot be reached: each process bounds alone the requests it forwards to a pool.

The fleet's places live in Redis (gateway/admission/places.py); without Redis, each gateway process holds at
most the pool's `max_in_flight` (LOCAL_BOUND if it sets none), and plans of the lowest priority only
`1 - reserved_for_paid` of that. A shed request is answered 503 with a Retry-After of 1–5 s drawn at random,
so shed clients do not retry in step: with Redis away there is no line to tell them their turn.
"""

from __future__ import annotations

import math
import random

from gateway.config.quotas import PoolPolicy
from gateway.errors import Overloaded

RETRY_AFTER_S = (1, 5)
# Requests one process forwards to a pool at once without Redis, where the pool sets no max_in_flight.
LOCAL_BOUND = 64


class Slot:
    """One request's place in a pool; `release` it when its answer has been sent (idempotent)."""

    def __init__(self, shedder: Shedder, pool: str) -> None:
        self._shedder = shedder
        self.pool = pool
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._shedder._in_flight[self.pool] -= 1


class Shedder:
    """Admits requests into pools up to each pool's bound for their priority."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._in_flight: dict[str, int] = {}
        self._rng = rng or random.Random()

    def in_flight(self, pool: str) -> int:
        """Requests `pool` holds now in this process."""
        return self._in_flight.get(pool, 0)

    def enter(self, pool: str, policy: PoolPolicy, *, lowest_priority: bool) -> Slot:
        """A place in `pool` for a request of this priority; Overloaded (503) if there is none for it now."""
        bound = policy.max_in_flight or LOCAL_BOUND
        if lowest_priority:
            bound = math.floor(bound * (1 - policy.reserved_for_paid))
        held = self._in_flight.get(pool, 0)
        if held >= bound:
            wait = self._rng.randint(*RETRY_AFTER_S)
            reason = "capacity left is kept for paid plans" if lowest_priority else "the service is at capacity"
            raise Overloaded(
                f"The image service is overloaded ({reason}); retry in {wait} s. You were not charged.",
                headers={"Retry-After": str(wait)},
            )
        self._in_flight[pool] = held + 1
        return Slot(self, pool)
