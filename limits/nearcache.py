"""Denial near-cache: once an account's daily quota is spent until T, answer locally until T.

Abusive clients then cost no Redis round trip. An entry is keyed by the account and its limits, so
a config change that alters the limits misses it; grants and resets publish the account on
INVALIDATIONS and every replica that follows the channel drops its entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from limits.decision import Decision
from limits.policy import DailyQuota, LimitSet

INVALIDATIONS = "qg:invalidate"

log = logging.getLogger("quotagate.limits")


class DenialCache:
    """Refusals by an exhausted daily quota, kept until the quota's day ends."""

    def __init__(self, *, size: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._clock = clock
        self._entries: dict[tuple[str, LimitSet], tuple[float, Decision]] = {}

    def get(self, account: str, limits: LimitSet, now: float | None = None) -> Decision | None:
        """The cached refusal, its waits shortened by the time since; None if there is none."""
        entry = self._entries.get((account, limits))
        if entry is None:
            return None
        stored_at, decision = entry
        elapsed = (self._clock() if now is None else now) - stored_at
        if decision.retry_after is None or elapsed >= decision.retry_after:
            del self._entries[(account, limits)]
            return None
        states = tuple(
            dataclasses.replace(
                s,
                reset_after=max(s.reset_after - elapsed, 0.0),
                retry_after=None if s.retry_after is None else max(s.retry_after - elapsed, 0.0),
            )
            for s in decision.states
        )
        denied = states[decision.states.index(decision.denied_by)] if decision.denied_by else None
        return dataclasses.replace(decision, states=states, denied_by=denied, cached=True)

    def remember(self, account: str, limits: LimitSet, decision: Decision, now: float | None = None) -> None:
        """Keep `decision` if a daily quota with nothing left refused it: no request can pass until T."""
        state = decision.denied_by
        if state is None or not isinstance(state.limit, DailyQuota) or state.remaining != 0:
            return
        if len(self._entries) >= self._size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[(account, limits)] = (self._clock() if now is None else now, decision)

    def forget(self, account: str) -> None:
        """Drop every entry of `account` (after a grant or reset)."""
        for key in [k for k in self._entries if k[0] == account]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    async def follow(self, redis: Redis, stop: asyncio.Event, *, retry_every: float = 1.0) -> None:
        """Drop entries as grants and resets are announced, until `stop` is set.

        Run it as a task. Stopping by flag as well as by cancel: a cancel that lands while redis-py
        is connecting can be swallowed there, and the loop must still end (within a second).
        """
        while not stop.is_set():
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(INVALIDATIONS)
                    # Whatever was announced while we were not listening is lost: start clean.
                    self.clear()
                    while not stop.is_set():
                        # An explicit wait: a blocking read would trip the client's short socket timeout.
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            self.forget(message["data"].decode())
            except (RedisError, OSError) as exc:
                if stop.is_set():
                    return
                log.warning("near-cache invalidations interrupted (%s); retrying", exc)
                self.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry_every)
