"""Load shedding: bound the requests each upstream pool holds, and shed the lowest priority first.

Counted per gateway process (each replica and worker sheds on what it holds itself; no Redis round
trip). Plans of the lowest priority in the config (free) may fill only `1 - reserved_for_paid` of a
pool's `max_in_flight`; the other plans may fill all of it. A shed request is answered 503 with a
Retry-After of 1–5 s drawn at random (so shed clients do not retry in step).

The check comes before the quota decision, so a shed request costs no quota; the place is taken
only once the request is admitted, so requests the quota refuses never hold one. Requests being
decided are not counted: a burst that arrives in one instant can pass the bound by as many
requests as are decided at once (about arrival rate × decision time).
"""

from __future__ import annotations

import math
import random

from gateway.config import PoolPolicy
from gateway.errors import Overloaded

RETRY_AFTER_S = (1, 5)


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

    def check(self, pool: str, policy: PoolPolicy, *, lowest_priority: bool) -> None:
        """Raise Overloaded (503) if a request of this priority may not enter `pool` now."""
        bound = policy.max_in_flight
        if lowest_priority:
            bound = math.floor(bound * (1 - policy.reserved_for_paid))
        if self._in_flight.get(pool, 0) >= bound:
            wait = self._rng.randint(*RETRY_AFTER_S)
            reason = "capacity left is kept for paid plans" if lowest_priority else "the service is at capacity"
            raise Overloaded(
                f"The image service is overloaded ({reason}); retry in {wait} s. You were not charged.",
                headers={"Retry-After": str(wait)},
            )

    def take(self, pool: str) -> Slot:
        """A place in `pool` for an admitted request."""
        self._in_flight[pool] = self._in_flight.get(pool, 0) + 1
        return Slot(self, pool)
