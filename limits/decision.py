"""The outcome of one decision: frozen values the gateway turns into an answer and headers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from limits.policy import Limit


class KeyState(IntEnum):
    """What an idempotency key said of a request (the codes decide.lua returns)."""

    NONE = 0  # no key, or refused by a limit: the key stays free
    CLAIMED = 1  # admitted and charged: the key is this request's until it ends
    IN_FLIGHT = 2  # the key's first request has not ended yet
    REUSED = 3  # the key was used for a request with another fingerprint
    REPLAYED = 4  # the key's first request ended and its answer is kept: `Decision.kept_answer`
    NOT_KEPT = 5  # the key's first request ended charged, but its answer was not kept
    EXPIRED = 6  # the key's first request ended, and its kept answer has expired


@dataclass(frozen=True, slots=True)
class LimitState:
    """Where one limit stands after a decision."""

    limit: Limit
    remaining: int | None  # None: an unlimited quota
    reset_after: float  # seconds until a bucket is full again, or until the quota's day ends
    retry_after: float | None  # seconds until it would admit the request; 0 now; None never
    day_start_us: int  # start of the day a quota charged, µs; 0 for buckets


@dataclass(frozen=True, slots=True)
class Decision:
    """Admitted or refused, with the state of every limit of the request."""

    allowed: bool
    cost: int
    now_us: int
    states: tuple[LimitState, ...]
    denied_by: LimitState | None  # of the refusing limits, the one that keeps the client waiting longest
    idempotency_key: str | None = None
    replayed: bool = False  # the key's first request's kept answer is the answer; nothing charged
    key_state: KeyState = KeyState.NONE
    claim: str | None = None  # the token of this request's claim on its idempotency key (KeyState.CLAIMED)
    kept_answer: bytes | None = None  # with KeyState.REPLAYED: the answer kept for the key
    cached: bool = False  # answered from this replica's denial near-cache, without Redis

    @property
    def retry_after(self) -> float | None:
        """Seconds until every enforced limit would admit the same request; None if one never will."""
        waits = [s.retry_after for s in self.states if not s.limit.shadow]
        if any(w is None for w in waits):
            return None
        return max((w for w in waits if w is not None), default=0.0)

    @property
    def shadow_refusals(self) -> tuple[LimitState, ...]:
        """The shadow limits that would have refused this request (and took nothing from it)."""
        return tuple(s for s in self.states if s.limit.shadow and s.retry_after != 0)
