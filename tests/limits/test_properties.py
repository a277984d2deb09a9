"""Property tests: the Lua engine and the Python reference model, fed the same random sequences of
requests, costs, refunds, grants and clock steps, give the same answer every time."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from limits import DailyQuota, Decision, Engine, LimitSet

from .model import Answer, Model, bucket

ZONES = [ZoneInfo("UTC"), ZoneInfo("Europe/Paris"), ZoneInfo("America/New_York")]
START = int(datetime(2026, 3, 27, 20, 0, tzinfo=ZoneInfo("UTC")).timestamp() * 1e6)  # DST weekend ahead
_accounts = itertools.count()

# Buckets refill no faster than one unit a minute: Redis expires keys in real time while the tests
# move an injected clock, and a key must not vanish under a test that did not move its clock.
limit_sets = st.builds(
    lambda rate, period, burst, daily, zone, shadow: LimitSet(
        buckets=(bucket(rate, period, burst, shadow=shadow[0]),),
        quotas=(DailyQuota(name="q", counter="daily", limit=daily, timezone=zone, shadow=shadow[1]),),
    ),
    rate=st.integers(1, 60),
    period=st.sampled_from([3600, 86400]),
    burst=st.integers(1, 8),
    daily=st.none() | st.integers(0, 12),
    zone=st.sampled_from(ZONES),
    # Which limits are in shadow mode: mostly none, so enforcement keeps most of the examples.
    shadow=st.sampled_from([(False, False)] * 4 + [(True, False), (False, True), (True, True)]),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("decide"), st.integers(0, 6)),
        st.tuples(st.just("refund"), st.integers(0, 50)),
        st.tuples(st.just("grant"), st.integers(1, 5)),
        st.tuples(st.just("wait"), st.integers(0, 30 * 3600 * 1_000_000)),
    ),
    min_size=1,
    max_size=40,
)


def _same(decision: Decision, answer: Answer) -> bool:
    rows = [
        (
            s.remaining,
            round(s.reset_after * 1e6),
            None if s.retry_after is None else round(s.retry_after * 1e6),
        )
        for s in decision.states
    ]
    return decision.allowed == answer.allowed and rows == answer.rows


async def _run(redis_url: str, limits: LimitSet, ops: list[tuple[str, int]]) -> None:
    client = Redis.from_url(redis_url)
    engine, model = Engine(client), Model(limits)
    try:
        account = f"prop-{next(_accounts)}"
        now = START
        admitted: list[tuple[Decision, list[int]]] = []
        for op, value in ops:
            if op == "wait":
                now += value
                model.expire(now)
            elif op == "decide":
                decision = await engine.decide(account, limits, value, now=now / 1e6)
                answer, days = model.decide(value, now)
                assert _same(decision, answer), (op, value, decision, answer)
                if decision.allowed and value > 0:
                    admitted.append((decision, days))
            elif op == "refund" and admitted:
                decision, days = admitted.pop(value % len(admitted))
                await engine.refund(account, limits, decision, now=now / 1e6)
                model.refund(decision.cost, days, now, [s.retry_after == 0 for s in decision.states])
            elif op == "grant":
                await engine.grant(account, limits.quotas[0], value, now=now / 1e6)
                model.grant(limits.quotas[0], value, now)
        final = await engine.peek(account, limits, now=now / 1e6)
        assert _same(final, model.decide(0, now)[0])
    finally:
        await engine.aclose()
        await client.aclose()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=limit_sets, ops=operations)
def test_engine_agrees_with_the_reference_model(redis_url: str, limits: LimitSet, ops: list[tuple[str, int]]) -> None:
    asyncio.run(_run(redis_url, limits, ops))
