"""Decide, refund, grant and reset against Redis: one atomic script call each."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from limits.calendar import day_starts
from limits.coalesce import Coalescer, Script
from limits.decision import Decision, KeyState, LimitState
from limits.endpoint import Endpoint
from limits.errors import ClockSkew, StoreUnavailable
from limits.idempotency import KeyLifetimes
from limits.keys import counter_key, idempotency_answer, idempotency_record, lease_set
from limits.lease import Lease
from limits.nearcache import INVALIDATIONS, DenialCache
from limits.policy import Bucket, DailyQuota, LimitSet
from limits.store import RedisClient

FLEET_SCRIPTS = (
    "fleet_enter",
    "fleet_claim",
    "fleet_cancel",
    "fleet_position",
    "fleet_leave",
    "fleet_renew",
    "fleet_advertise",
    "fleet_state",
    "fleet_orphans",
)


def _script(name: str) -> Script:
    folder = resources.files("limits").joinpath("lua")
    # The fleet scripts share the layout of a pool's keys and its helpers (fleet.lua).
    shared = ("prelude", "fleet") if name in FLEET_SCRIPTS else ("prelude",)
    return Script("".join(folder.joinpath(f"{part}.lua").read_text() for part in (*shared, name)))


class Engine:
    """Charges, refunds and reads the limits of accounts; all time comes from Redis unless `now` is given.

    Calls on a single Redis are coalesced per event-loop turn on the engine's own connection to the
    server `redis` talks to; a cluster client sends each alone. `near_cache` answers exhausted
    accounts locally until their day ends. Close the engine (`aclose`, or `async with`) before its loop ends.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        near_cache: DenialCache | None = None,
        clock: Callable[[], float] = time.time,
        key_lifetimes: KeyLifetimes | None = None,
    ) -> None:
        self._redis = redis
        self._clock = clock  # this process's clock: it only picks which day starts to send
        self._coalescer = Coalescer(Endpoint.of(redis)) if isinstance(redis, Redis) else None
        self._key_lifetimes = key_lifetimes or KeyLifetimes()
        names = ("decide", "refund", "grant", "keep", "lease", "renew", "release", *FLEET_SCRIPTS)
        self._scripts = {name: _script(name) for name in names}
        self._registered = {name: redis.register_script(s.source) for name, s in self._scripts.items()}
        self.near_cache = near_cache

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the engine's own connection (the client it was given is the caller's to close)."""
        if self._coalescer is not None:
            await self._coalescer.aclose()

    async def decide(
        self,
        account: str,
        limits: LimitSet,
        cost: int,
        *,
        now: float | None = None,
        idempotency_key: str | None = None,
        fingerprint: str = "",
    ) -> Decision:
        """Charge `cost` against every limit, or against none if one refuses.

        With an `idempotency_key` (and the `fingerprint` of what the request asks), a charged request
        claims the key (KeyState.CLAIMED) until it ends: `keep_answer` or `refund` ends it. A key already
        claimed is answered without looking at any limit, charging nothing (see KeyState). A request
        that costs nothing ignores its key.
        """
        keyed = idempotency_key is not None and cost > 0
        # A keyed request may be owed a kept answer, which the near-cache cannot know of.
        if self.near_cache is not None and cost > 0 and not keyed:
            cached = self.near_cache.get(account, limits, now)
            if cached is not None:
                return cached
        wall = self._clock() if now is None else now
        keys = _keys(account, limits)
        lease_ms, claim = 0, ""
        if idempotency_key is not None and keyed:
            keys += [idempotency_record(account, idempotency_key), idempotency_answer(account, idempotency_key)]
            lease_ms, claim = self._key_lifetimes.in_flight_ms, secrets.token_hex(8)
        args: list[Any] = [_now_arg(now), cost, len(limits.buckets), lease_ms, limits.shadow_arg, fingerprint, claim]
        args.extend(limits.bucket_args)
        for quota in limits.quotas:
            args.append(-1 if quota.limit is None else quota.limit)
            args.extend(day_starts(quota.timezone, wall))
        reply = await self._call("decide", keys, args)
        decision = _decision(limits, cost, reply, idempotency_key if keyed else None, claim)
        if self.near_cache is not None and decision.denied_by is not None:
            self.near_cache.remember(account, limits, decision, now)
        return decision

    async def peek(self, account: str, limits: LimitSet, *, now: float | None = None) -> Decision:
        """Where every limit stands, charging nothing."""
        return await self.decide(account, limits, 0, now=now)

    async def usage(
        self, account: str, limits: LimitSet, *, now: float | None = None
    ) -> tuple[Decision, dict[str, int]]:
        """Where every limit stands (as `peek`), and the units each daily quota has counted today, by name.

        Unlimited quotas count too, so this is the one place their usage can be read.
        """
        decision = await self.peek(account, limits, now=now)
        used: dict[str, int] = {}
        for state in decision.states:
            if isinstance(state.limit, DailyQuota):
                try:
                    day, units = await self._redis.hmget(counter_key(account, state.limit.counter), ["d", "u"])
                except (RedisError, OSError) as exc:
                    raise StoreUnavailable(f"redis unavailable: {exc}") from exc
                # The hash holds the day it counts (see decide.lua); an older day's units are not today's.
                today = day is not None and int(day) == state.day_start_us
                used[state.limit.name] = int(units) if today and units is not None else 0
        return decision, used

    async def refund(self, account: str, limits: LimitSet, decision: Decision, *, now: float | None = None) -> None:
        """Give back what an admitted `decision` took, and free the idempotency key it claimed.

        A decision that claimed a key is refunded only while it holds the claim: once, and never after
        `keep_answer`.
        """
        call = _refund_call(account, decision)
        if call is not None:
            await self._call("refund", call[0], [_now_arg(now), *call[1]])

    def refund_of(self, account: str, decision: Decision) -> str | None:
        """What refunding `decision` takes, as text another process can keep and act on (`refund_later`);
        None if it took nothing."""
        call = _refund_call(account, decision)
        return None if call is None else json.dumps(call)

    async def refund_later(self, refund: str, *, now: float | None = None) -> None:
        """Give back what `refund_of` described (once: a second call would give it back again)."""
        keys, args = json.loads(refund)
        await self._call("refund", keys, [_now_arg(now), *args])

    async def keep_answer(self, account: str, decision: Decision, answer: bytes | None) -> bool:
        """End the idempotency key `decision` claimed, its charge standing: keep `answer` for replays.

        `answer` None (too big, or not all sent) keeps none: a replay is then told so. False if the
        decision no longer held its claim (refunded, or its lease ran out) and nothing was written.
        """
        key, claim = decision.idempotency_key, decision.claim
        if key is None or claim is None:
            return False
        lifetimes = self._key_lifetimes
        keys = [idempotency_record(account, key), idempotency_answer(account, key)]
        args: list[Any] = [claim, answer or b"", lifetimes.answer_ms, lifetimes.remembered_ms]
        return bool(await self._call("keep", keys, args))

    async def grant(self, account: str, quota: DailyQuota, units: int, *, now: float | None = None) -> int:
        """Add `units` bonus units to `account`'s quota for today; returns today's grants in all."""
        if units < 1:
            raise ValueError(f"grant at least 1 unit, not {units}")
        wall = self._clock() if now is None else now
        args = [_now_arg(now), units, *day_starts(quota.timezone, wall)]
        granted = int(await self._call("grant", [counter_key(account, quota.counter)], args))
        await self._announce(account)
        return granted

    async def lease(self, account: str, limit: int, ttl: float, *, now: float | None = None) -> Lease | None:
        """One of `account`'s `limit` concurrent places for `ttl` seconds unless renewed; None if all are held."""
        lease = Lease(account, secrets.token_hex(8))
        reply = await self._call(
            "lease", [lease_set(account)], [_now_arg(now), limit, round(ttl * 1_000_000), lease.id]
        )
        return lease if reply[0] == 1 else None

    async def renew(self, lease: Lease, ttl: float, *, now: float | None = None) -> bool:
        """Extend a held lease to `ttl` seconds from now; False if it had lapsed (its place may be taken)."""
        reply = await self._call("renew", [lease_set(lease.account)], [_now_arg(now), round(ttl * 1_000_000), lease.id])
        return bool(reply)

    async def release(self, lease: Lease) -> None:
        """Give a lease's place back."""
        await self._call("release", [lease_set(lease.account)], [lease.id])

    async def reset(self, account: str, limits: LimitSet) -> None:
        """Forget `account`'s usage: every bucket full, every quota unused, grants gone."""
        try:
            await self._redis.delete(*_keys(account, limits))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc
        await self._announce(account)

    async def _announce(self, account: str) -> None:
        if self.near_cache is not None:
            self.near_cache.forget(account)
        try:
            await self._redis.publish(INVALIDATIONS, account)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc

    async def call_script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of the package's scripts (limits/lua/NAME.lua): for the modules of `limits` built on the engine."""
        return await self._call(name, keys, args)

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        try:
            if self._coalescer is not None:
                return await self._coalescer.call(script, keys, args)
            return await self._registered[name](keys=keys, args=args)
        except ResponseError as exc:
            if "clock skew" in str(exc):
                raise ClockSkew(str(exc)) from exc
            raise StoreUnavailable(f"redis refused the script: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc


def _refund_call(account: str, decision: Decision) -> tuple[list[str], list[Any]] | None:
    """refund.lua's keys and arguments (but `now`) to give back what `decision` took; None if it took nothing."""
    if not decision.allowed or decision.cost == 0 or decision.replayed:
        return None
    # Only what was charged: a shadow limit that would have refused took nothing.
    charged = [s for s in decision.states if s.retry_after == 0]
    buckets = [s.limit for s in charged if isinstance(s.limit, Bucket)]
    keys = [counter_key(account, s.limit.counter) for s in charged]
    if decision.idempotency_key is not None and decision.claim is not None:
        keys.append(idempotency_record(account, decision.idempotency_key))
    args: list[Any] = [decision.cost, len(buckets), decision.claim or ""]
    args.extend(b.interval_us for b in buckets)
    args.extend(s.day_start_us for s in charged if isinstance(s.limit, DailyQuota))
    return keys, args


def _now_arg(now: float | None) -> int | str:
    return "" if now is None else round(now * 1_000_000)


def _keys(account: str, limits: LimitSet) -> list[str]:
    return [counter_key(account, limit.counter) for limit in limits]


def _decision(limits: LimitSet, cost: int, reply: list[Any], idempotency: str | None, claim: str) -> Decision:
    # hiredis hands Lua's integers back as ints: the reply is read as it is, with no conversions.
    denied, now_us, key_state = reply[0], reply[1], KeyState(reply[2])
    if key_state > KeyState.CLAIMED:  # answered by the key alone: no limit was looked at, nothing charged
        replayed = key_state == KeyState.REPLAYED
        return Decision(
            allowed=replayed,
            cost=cost,
            now_us=now_us,
            states=(),
            denied_by=None,
            idempotency_key=idempotency,
            replayed=replayed,
            key_state=key_state,
            kept_answer=reply[3] if replayed else None,
        )
    states = []
    refusing = []
    at = 3
    for limit in limits:
        remaining, reset, retry, day = reply[at], reply[at + 1], reply[at + 2], reply[at + 3]
        state = LimitState(
            limit,
            None if remaining < 0 else remaining,
            reset / 1_000_000,
            None if retry < 0 else retry / 1_000_000,
            day,
        )
        states.append(state)
        if retry != 0 and not limit.shadow:
            refusing.append(state)
        at += 4
    return Decision(
        allowed=denied == 0,
        cost=cost,
        now_us=now_us,
        states=tuple(states),
        # The limit that keeps the client waiting longest is the one to report.
        denied_by=max(refusing, key=_wait) if denied else None,
        idempotency_key=idempotency,
        key_state=key_state,
        claim=claim if key_state == KeyState.CLAIMED else None,
    )


def _wait(state: LimitState) -> float:
    return float("inf") if state.retry_after is None else state.retry_after
