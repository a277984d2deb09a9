"""Withdrawals: the gateway takes back a request its client left, and learns whether it had started.

The gateway tags each request it forwards with a job token (X-Quotagate-Job, random, its own) and, when
its client hangs up before the answer, sends `DELETE /v1/jobs/{token}`. Whether the job had started is
decided here, on the event loop, against the batcher's queue: a job still queued is removed and its
request answered 409 `withdrawn` (the gateway refunds it); one already taken into a batch runs on and
is answered as usual (the gateway keeps the charge). The original request's answer is the one verdict:
the withdrawal's own answer only says what happened.

A withdrawal may overtake its request (sent on another connection, or while the request's body is still
arriving): its token is remembered for `remember_s`, and a request that arrives with it is answered
`withdrawn` without being queued. Tokens are remembered at most `capacity` at a time, oldest dropped
first; a request that arrives after its token was forgotten simply runs and is charged.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from backend.scheduling import Job

__all__ = ["JOB_HEADER", "Withdrawals"]

JOB_HEADER = "X-Quotagate-Job"


class Withdrawals:
    """Jobs by token while their requests wait, and the tokens withdrawn before their request came."""

    def __init__(
        self, *, remember_s: float = 60.0, capacity: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._remember_s = remember_s
        self._capacity = capacity
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._early: OrderedDict[str, float] = OrderedDict()  # token -> when it is forgotten

    def withdrawn_early(self, token: str) -> bool:
        """True if `token` was withdrawn before its request arrived (the request is then not queued)."""
        self._expire()
        return self._early.pop(token, None) is not None

    def track(self, token: str, job: Job) -> None:
        self._jobs[token] = job

    def forget(self, token: str) -> None:
        self._jobs.pop(token, None)

    def withdraw(self, token: str, take_from_queue: Callable[[Job], bool]) -> bool:
        """Withdraw the request of `token`; False if its job had started, so it stands and is charged."""
        job = self._jobs.get(token)
        if job is None:  # not arrived yet (or already answered, in which case this is harmless)
            self._expire()
            self._early[token] = self._clock() + self._remember_s
            while len(self._early) > self._capacity:
                self._early.popitem(last=False)
            return True
        return take_from_queue(job)

    def _expire(self) -> None:
        now = self._clock()
        while self._early:
            token, until = next(iter(self._early.items()))
            if until > now:
                return
            del self._early[token]
