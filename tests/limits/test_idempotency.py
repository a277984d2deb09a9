"""Idempotency keys in the engine: a key binds one fingerprint, one charge and one kept answer."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from limits import Bucket, DailyQuota, Engine, KeyLifetimes, KeyState, LimitSet
from limits.keys import idempotency_answer, idempotency_record
from tests.conftest import MakeEngine

pytestmark = pytest.mark.anyio

NOON = datetime(2026, 11, 21, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()
_accounts = itertools.count()


def plan(daily: int | None = 3) -> LimitSet:
    return LimitSet(
        buckets=(Bucket("free-rate", "rate", rate=600, period=60, burst=100),),
        quotas=(DailyQuota("free-daily", "daily", limit=daily, timezone=ZoneInfo("UTC")),),
    )


async def used(engine: Engine, account: str, limits: LimitSet) -> int:
    return (await engine.usage(account, limits, now=NOON))[1]["free-daily"]


async def test_a_key_in_flight_answers_in_flight_and_charges_nothing(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), plan()
    first = await engine.decide("ann", limits, 1, now=NOON, idempotency_key="k", fingerprint="f1")
    again = await engine.decide("ann", limits, 1, now=NOON, idempotency_key="k", fingerprint="f1")
    other = await engine.decide("ann", limits, 2, now=NOON, idempotency_key="k", fingerprint="f2")
    assert first.allowed and first.key_state == KeyState.CLAIMED and first.claim is not None
    assert not again.allowed and again.key_state == KeyState.IN_FLIGHT and again.claim is None
    assert not other.allowed and other.key_state == KeyState.REUSED
    assert await used(engine, "ann", limits) == 1
    assert 0 < await redis_client.pttl(idempotency_record("ann", "k")) <= KeyLifetimes().in_flight_ms


async def test_a_kept_answer_is_replayed_and_never_refunded(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), plan()
    first = await engine.decide("ann", limits, 2, now=NOON, idempotency_key="k", fingerprint="f")
    assert await engine.keep_answer("ann", first, b"the answer")
    await engine.refund("ann", limits, first, now=NOON)  # the answer is kept: its charge stands
    replay = await engine.decide("ann", limits, 2, now=NOON, idempotency_key="k", fingerprint="f")
    reused = await engine.decide("ann", limits, 1, now=NOON, idempotency_key="k", fingerprint="g")
    assert replay.allowed and replay.replayed and replay.kept_answer == b"the answer"
    assert reused.key_state == KeyState.REUSED and reused.kept_answer is None
    await engine.refund("ann", limits, replay, now=NOON)
    assert await used(engine, "ann", limits) == 2
    lifetimes = KeyLifetimes()
    assert 0 < await redis_client.pttl(idempotency_answer("ann", "k")) <= lifetimes.answer_ms
    assert lifetimes.answer_ms < await redis_client.pttl(idempotency_record("ann", "k")) <= lifetimes.remembered_ms


async def test_an_answer_not_kept_and_an_expired_answer_are_told_apart(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), plan()
    unkept = await engine.decide("ann", limits, 1, now=NOON, idempotency_key="big", fingerprint="f")
    assert await engine.keep_answer("ann", unkept, None)
    kept = await engine.decide("ann", limits, 1, now=NOON, idempotency_key="old", fingerprint="f")
    assert await engine.keep_answer("ann", kept, b"answer")
    await redis_client.delete(idempotency_answer("ann", "old"))  # what its lifetime's end does
    assert (await engine.decide("ann", limits, 1, now=NOON, idempotency_key="big", fingerprint="f")).key_state == (
        KeyState.NOT_KEPT
    )
    assert (await engine.decide("ann", limits, 1, now=NOON, idempotency_key="old", fingerprint="f")).key_state == (
        KeyState.EXPIRED
    )
    assert await used(engine, "ann", limits) == 2


async def test_a_refund_frees_the_key_and_a_refunded_claim_keeps_no_answer(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), plan()
    first = await engine.decide("ann", limits, 1, now=NOON, idempotency_key="k", fingerprint="f")
    await engine.refund("ann", limits, first, now=NOON)
    assert not await engine.keep_answer("ann", first, b"answer")  # refunded: no answer may be replayed for free
    retried = await engine.decide("ann", limits, 1, now=NOON, idempotency_key="k", fingerprint="f")
    assert retried.key_state == KeyState.CLAIMED
    assert await used(engine, "ann", limits) == 1


async def test_a_request_refused_by_a_limit_leaves_its_key_free(redis_client: Redis, make_engine: MakeEngine) -> None:
    engine, limits = make_engine(redis_client), plan(daily=1)
    assert (await engine.decide("ann", limits, 2, now=NOON, idempotency_key="k", fingerprint="f")).key_state == (
        KeyState.NONE
    )
    assert not await redis_client.exists(idempotency_record("ann", "k"))
    assert (await engine.decide("ann", limits, 1, now=NOON, idempotency_key="k", fingerprint="g")).allowed


async def test_concurrent_first_requests_with_one_key_claim_it_once(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, limits = make_engine(redis_client), plan(daily=None)
    decisions = await asyncio.gather(
        *(engine.decide("ann", limits, 1, idempotency_key="k", fingerprint="f") for _ in range(20))
    )
    states = sorted(d.key_state for d in decisions)
    assert states == [KeyState.CLAIMED] + [KeyState.IN_FLIGHT] * 19
    assert (await engine.usage("ann", limits))[1]["free-daily"] == 1


# One request: its key (or none), which of three bodies it sends (body b costs b + 1), and how it ends
# when the engine claims or charges it: its answer kept, ended without a kept answer, refunded (the
# upstream failed), or still in flight when the sequence ends.
requests = st.lists(
    st.tuples(
        st.sampled_from([None, "a", "b", "c"]),
        st.integers(0, 2),
        st.sampled_from(["kept", "unkept", "refunded", "open"]),
    ),
    min_size=1,
    max_size=30,
)


async def _run(redis_url: str, daily: int, sequence: list[tuple[str | None, int, str]]) -> None:
    client = Redis.from_url(redis_url)
    engine, limits = Engine(client), plan(daily)
    try:
        account = f"idem-{next(_accounts)}"
        keys: dict[str, tuple[str, int, str]] = {}  # key → (the fingerprint it is bound to, its cost, its end)
        charged = forwarded = refunded = 0
        for key, body, end in sequence:
            cost, fingerprint = body + 1, f"body-{body}"
            decision = await engine.decide(
                account, limits, cost, now=NOON, idempotency_key=key, fingerprint=fingerprint
            )
            bound = keys.get(key) if key is not None else None
            if bound is not None:
                expected = {"open": KeyState.IN_FLIGHT, "kept": KeyState.REPLAYED, "unkept": KeyState.NOT_KEPT}
                want = KeyState.REUSED if bound[0] != fingerprint else expected[bound[2]]
                assert decision.key_state == want, (key, body, bound, decision)
                if want == KeyState.REPLAYED:
                    assert decision.kept_answer == f"answer to {bound[0]}".encode()
            else:
                fits = charged + cost <= daily
                assert decision.allowed == fits, (key, body, charged, decision)
                assert decision.key_state == (KeyState.NONE if key is None or not fits else KeyState.CLAIMED)
            # What the gateway forwards: an admitted decision with no kept answer to replay.
            if not decision.allowed or decision.kept_answer is not None:
                continue
            forwarded += cost
            charged += cost
            if end == "refunded":
                await engine.refund(account, limits, decision, now=NOON)
                charged -= cost
                refunded += cost
            elif key is not None:
                if end != "open":
                    answer = f"answer to {fingerprint}".encode() if end == "kept" else None
                    assert await engine.keep_answer(account, decision, answer)
                keys[key] = (fingerprint, cost, end)
        # Every request that reached the backend was charged once, and only failures were given back.
        assert (await engine.usage(account, limits, now=NOON))[1]["free-daily"] == charged == forwarded - refunded
    finally:
        await engine.aclose()
        await client.aclose()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(daily=st.integers(0, 12), sequence=requests)
def test_what_reaches_the_backend_is_charged_once_whatever_keys_and_bodies_are_sent(
    redis_url: str, daily: int, sequence: list[tuple[str | None, int, str]]
) -> None:
    asyncio.run(_run(redis_url, daily, sequence))
