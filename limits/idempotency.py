"""How long the engine keeps what an idempotency key bound: the claim, the kept answer, and the used key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class KeyLifetimes:
    """Seconds each part of an idempotency record lives.

    `in_flight`: a claimed key's longest wait for its request to end; past it the key is free again, so
    a replica that died mid-request does not hold its keys for ever. `answer`: how long a kept answer is
    replayed. `remembered`: how long an ended key is known at all, counted from its end; between
    `answer` and `remembered` a replay is told the answer expired, after it the key is new again.
    """

    in_flight: float = 15 * 60.0
    answer: float = 24 * 3600.0
    remembered: float = 48 * 3600.0

    def __post_init__(self) -> None:
        if min(self.in_flight, self.answer, self.remembered) <= 0:
            raise ValueError("idempotency lifetimes must be positive")
        if self.remembered < self.answer:
            raise ValueError("an ended key must be remembered at least as long as its answer is kept")

    @property
    def in_flight_ms(self) -> int:
        return round(self.in_flight * 1000)

    @property
    def answer_ms(self) -> int:
        return round(self.answer * 1000)

    @property
    def remembered_ms(self) -> int:
        return round(self.remembered * 1000)
