"""Denial near-cache: once an account's daily quota is spent until T, answer locally until T.

Abusive clients then cost no Redis round trip. An entry is kept per account with the limits it was
made under, so a plan change or a config change that alters the limits misses it; grants and
resets publish the account on INVALIDATIONS and every replica that follows the channel drops its entry.
Other per-replica caches of account state (the gateway's key → account → plan cache) follow the
same channel through `follow_invalidations`: one subscription per process, one message per changed account.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from limits.decision import Decision
from limits.policy import DailyQuota, LimitSet

INVALIDATIONS = "qg:invalidate"

log = logging.getLogger("quotagate.limits")


# A refusal served from the cache is rebuilt, its waits shortened, at most this often; in between
# the same answer is served again, overstating the wait by at most this much (never understating it).
REFRESH_S = 0.05


@dataclasses.dataclass(slots=True)
class _Entry:
    limits: LimitSet
    stored_at: float
    decision: Decision  # as Redis answered it
    served_at: float  # when `served` was made from it
    served: Decision  # `decision` with its waits shortened by served_at - stored_at


class DenialCache:
    """Refusals by an exhausted daily quota, kept until the quota's day ends; one entry per account."""

    def __init__(self, *, size: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def get(self, account: str, limits: LimitSet, now: float | None = None) -> Decision | None:
        """The cached refusal, its waits shortened by the time since; None if there is none."""
        entry = self._entries.get(account)
        if entry is None:
            return None
        if entry.limits is not limits and entry.limits != limits:  # another plan, or ops changed it
            return None
        at = self._clock() if now is None else now
        if 0 <= at - entry.served_at < REFRESH_S:
            return entry.served
        elapsed = at - entry.stored_at
        retry_after = entry.decision.retry_after
        if retry_after is None or elapsed >= retry_after:
            del self._entries[account]
            return None
        entry.served, entry.served_at = _aged(entry.decision, elapsed), at
        return entry.served

    def remember(self, account: str, limits: LimitSet, decision: Decision, now: float | None = None) -> None:
        """Keep `decision` if a daily quota with nothing left refused it: no request can pass until T."""
        state = decision.denied_by
        if state is None or not isinstance(state.limit, DailyQuota) or state.remaining != 0:
            return
        if len(self._entries) >= self._size and account not in self._entries:
            self._entries.pop(next(iter(self._entries)))
        at = self._clock() if now is None else now
        self._entries[account] = _Entry(limits, at, decision, at, dataclasses.replace(decision, cached=True))

    def forget(self, account: str) -> None:
        """Drop `account`'s entry (after a grant or reset)."""
        self._entries.pop(account, None)

    def clear(self) -> None:
        self._entries.clear()

    async def follow(self, redis: Redis, stop: asyncio.Event, *, retry_every: float = 1.0) -> None:
        """Drop entries as grants and resets are announced, until `stop` is set (see follow_invalidations)."""
        await follow_invalidations(redis, stop, [self], retry_every=retry_every)


class AccountCache(Protocol):
    """A per-replica cache of what Redis says about accounts, kept true by INVALIDATIONS."""

    def forget(self, account: str) -> None: ...

    def clear(self) -> None: ...


async def follow_invalidations(
    redis: Redis, stop: asyncio.Event, caches: Sequence[AccountCache], *, retry_every: float = 1.0
) -> None:
    """Tell every cache of each account announced on INVALIDATIONS, until `stop` is set.

    Run it as a task. Stopping by flag as well as by cancel: a cancel that lands while redis-py
    is connecting can be swallowed there, and the loop must still end (within a second).
    """
    while not stop.is_set():
        try:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(INVALIDATIONS)
                # Whatever was announced while we were not listening is lost: start clean.
                for cache in caches:
                    cache.clear()
                while not stop.is_set():
                    # An explicit wait: a blocking read would trip the client's short socket timeout.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        account = message["data"].decode()
                        for cache in caches:
                            cache.forget(account)
        except (RedisError, OSError) as exc:
            if stop.is_set():
                return
            log.warning("invalidations interrupted (%s); retrying", exc)
            for cache in caches:
                cache.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_every)


def _aged(decision: Decision, elapsed: float) -> Decision:
    """`decision` as seen `elapsed` seconds later, marked as served from the cache."""
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
