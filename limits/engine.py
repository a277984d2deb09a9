"""Decide and refund requests against Redis: one atomic script call each."""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from redis.exceptions import RedisError, ResponseError

from limits.calendar import day_starts
from limits.decision import Decision, LimitState
from limits.errors import ClockSkew, StoreUnavailable
from limits.keys import counter_key
from limits.policy import LimitSet
from limits.store import RedisClient


def _script(name: str) -> str:
    return resources.files("limits").joinpath(f"lua/{name}.lua").read_text()


class Engine:
    """Charges, refunds and reads the limits of accounts; all time comes from Redis unless `now` is given."""

    def __init__(self, redis: RedisClient) -> None:
        self._decide = redis.register_script(_script("decide"))
        self._refund = redis.register_script(_script("refund"))

    async def decide(self, account: str, limits: LimitSet, cost: int, *, now: float | None = None) -> Decision:
        """Charge `cost` against every limit, or against none if one refuses."""
        wall = time.time() if now is None else now
        args: list[Any] = [_now_arg(now), cost, len(limits.buckets), *limits.bucket_args]
        for quota in limits.quotas:
            args.append(-1 if quota.limit is None else quota.limit)
            args.extend(day_starts(quota.timezone, wall))
        reply = await self._call(self._decide, _keys(account, limits), args)
        return _decision(limits, cost, reply)

    async def peek(self, account: str, limits: LimitSet, *, now: float | None = None) -> Decision:
        """Where every limit stands, charging nothing."""
        return await self.decide(account, limits, 0, now=now)

    async def refund(self, account: str, limits: LimitSet, decision: Decision, *, now: float | None = None) -> None:
        """Give back what an admitted `decision` took. Call it at most once per decision."""
        if not decision.allowed or decision.cost == 0:
            return
        args: list[Any] = [_now_arg(now), decision.cost, len(limits.buckets)]
        args.extend(b.interval_us for b in limits.buckets)
        args.extend(s.day_start_us for s in decision.states[len(limits.buckets) :])
        await self._call(self._refund, _keys(account, limits), args)

    @staticmethod
    async def _call(script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except ResponseError as exc:
            if "clock skew" in str(exc):
                raise ClockSkew(str(exc)) from exc
            raise StoreUnavailable(f"redis refused the script: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc


def _now_arg(now: float | None) -> int | str:
    return "" if now is None else round(now * 1_000_000)


def _keys(account: str, limits: LimitSet) -> list[str]:
    return [counter_key(account, limit.counter) for limit in limits]


def _decision(limits: LimitSet, cost: int, reply: list[int]) -> Decision:
    denied, now_us = int(reply[0]), int(reply[1])
    states = []
    for i, limit in enumerate(limits):
        remaining, reset, retry, day = (int(v) for v in reply[2 + 4 * i : 6 + 4 * i])
        states.append(
            LimitState(
                limit=limit,
                remaining=None if remaining < 0 else remaining,
                reset_after=reset / 1_000_000,
                retry_after=None if retry < 0 else retry / 1_000_000,
                day_start_us=day,
            )
        )
    refusing = [s for s in states if s.retry_after != 0]
    return Decision(
        allowed=denied == 0,
        cost=cost,
        now_us=now_us,
        states=tuple(states),
        # The limit that keeps the client waiting longest is the one to report.
        denied_by=max(refusing, key=_wait) if denied else None,
    )


def _wait(state: LimitState) -> float:
    return float("inf") if state.retry_after is None else state.retry_after
