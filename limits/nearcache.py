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
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from limits.decision import Decision, LimitState
from limits.policy import DailyQuota, LimitSet

INVALIDATIONS = "qg:invalidate"

log = logging.getLogger("quotagate.limits")


# A refusal served from the cache is rebuilt, its waits shortened, at most this often; in between
# the same answer is served again, overstating the wait by at most this much (never understating it).
REFRESH_S = 0.05
# Distinct limit sets (plans × config versions) entries may name before the cache starts afresh.
MAX_LIMIT_SETS = 1024


# A refusal as plain values: (allowed, cost, now_us, idempotency key, replayed, index of the refusing
# state, and per state (remaining, reset_after, retry_after, day_start_us)).
_Plain = tuple[bool, int, int, str | None, bool, int, tuple[tuple[int | None, float, float | None, int], ...]]
# Per account: (id of the LimitSet it was refused under, when it was stored, its retry_after then
# (None: never), the refusal).
_Entry = tuple[int, float, float | None, _Plain]


class DenialCache:
    """Refusals by an exhausted daily quota, kept until the quota's day ends; one entry per account.

    An entry holds only numbers, strings and tuples of them, which Python's collector stops tracking:
    100,000 entries do not lengthen its full collections. As objects (a Decision and its states per
    account) they did, by ~70 ms a collection once 20,000 accounts were spent (bench/surge.py), and
    every request in flight waited that long. The Decision objects served are built from an entry
    again at most every REFRESH_S, and kept only for that long.
    """

    def __init__(self, *, size: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._size = size
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._limit_sets: dict[int, LimitSet] = {}  # by id; held, so an id is not reused while entries name it
        self._served: dict[str, Decision] = {}  # built in the current window of REFRESH_S, by account
        self._window_start = -math.inf

    def get(self, account: str, limits: LimitSet, now: float | None = None) -> Decision | None:
        """The cached refusal, its waits shortened by the time since; None if there is none."""
        entry = self._entries.get(account)
        if entry is None:
            return None
        limit_set_id, stored_at, retry_after, plain = entry
        stored_under = self._limit_sets[limit_set_id]
        if stored_under is not limits and stored_under != limits:  # another plan, or ops changed it
            return None
        at = self._clock() if now is None else now
        if 0 <= at - self._window_start < REFRESH_S:
            served = self._served.get(account)
            if served is not None:
                return served
        else:  # a new window: what was served before is rebuilt when asked for
            self._served.clear()
            self._window_start = at
        elapsed = at - stored_at
        if retry_after is None or elapsed >= retry_after:
            del self._entries[account]
            return None
        served = self._served[account] = _decision(stored_under, plain, elapsed)
        return served

    def remember(self, account: str, limits: LimitSet, decision: Decision, now: float | None = None) -> None:
        """Keep `decision` if a daily quota with nothing left refused it: no request can pass until T."""
        state = decision.denied_by
        if state is None or not isinstance(state.limit, DailyQuota) or state.remaining != 0:
            return
        if len(self._entries) >= self._size and account not in self._entries:
            self._entries.pop(next(iter(self._entries)))
        if len(self._limit_sets) >= MAX_LIMIT_SETS and id(limits) not in self._limit_sets:
            self.clear()  # config reloaded this many times: start again rather than hold every old limit set
        self._limit_sets[id(limits)] = limits
        at = self._clock() if now is None else now
        self._entries[account] = (id(limits), at, decision.retry_after, _plain(decision))
        self._served.pop(account, None)

    def forget(self, account: str) -> None:
        """Drop `account`'s entry (after a grant or reset)."""
        self._entries.pop(account, None)
        self._served.pop(account, None)

    def clear(self) -> None:
        self._entries.clear()
        self._limit_sets.clear()
        self._served.clear()

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


def _plain(decision: Decision) -> _Plain:
    states = tuple((s.remaining, s.reset_after, s.retry_after, s.day_start_us) for s in decision.states)
    assert decision.denied_by is not None
    refusing = decision.states.index(decision.denied_by)
    return (
        decision.allowed,
        decision.cost,
        decision.now_us,
        decision.idempotency_key,
        decision.replayed,
        refusing,
        states,
    )


def _decision(limits: LimitSet, plain: _Plain, elapsed: float) -> Decision:
    """The refusal `plain` holds, as seen `elapsed` seconds after it was stored, marked as served from the cache."""
    allowed, cost, now_us, idempotency_key, replayed, refusing, values = plain
    states = tuple(
        LimitState(
            limit,
            remaining,
            max(reset_after - elapsed, 0.0),
            None if retry_after is None else max(retry_after - elapsed, 0.0),
            day_start_us,
        )
        for limit, (remaining, reset_after, retry_after, day_start_us) in zip(limits, values, strict=True)
    )
    return Decision(
        allowed=allowed,
        cost=cost,
        now_us=now_us,
        states=states,
        denied_by=states[refusing],
        idempotency_key=idempotency_key,
        replayed=replayed,
        cached=True,
    )
