"""The pool's places and line in Redis, against the rules they promise, with time injected.

A random mix of arrivals (sync and async, free and paid, returning early, on time or never), job claims,
releases, lapses and capacity changes is played against a real redis-server, and after every step:

- the images held never pass the capacity the backends advertise, on any one backend nor in all, nor the
  free plan its share;
- within a plan, turns are told in arrival order: a later ticket is never told an earlier turn;
- an account holds at most one sync ticket per line, and its plan's number of jobs;
- a paid request is never queued behind a free one.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limits import Admitted, Engine, Fleet, LinePlan, PoolRules, Queued, RedisClient, Turned, connect
from tests.conftest import MakeEngine

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.123457  # µs that Lua would round away if it wrote them in e-notation
POOL = "diffusion"
FREE, PRO = LinePlan("free", 0, True), LinePlan("pro", 10, False)
RULES = PoolRules(plans=(PRO, FREE), reserved_for_paid=0.25, ceiling=None, line_cap=50, grace=5.0)
JOB_PLACES = 2


def rules(**changes: Any) -> PoolRules:
    values = {name: getattr(RULES, name) for name in RULES.__dataclass_fields__}
    return PoolRules(**{**values, **changes})


@pytest.fixture
async def fleet(redis_url: str, make_engine: MakeEngine) -> Fleet:
    return Fleet(make_engine(connect(redis_url)), place_ttl=30.0)


async def test_places_up_to_the_advertised_capacity_then_tickets_in_arrival_order(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 4, 2.0, 10, now=T0)
    entered = [
        await fleet.enter(POOL, RULES, "pro", f"p{i}", 1, queue="sync", account_places=1, now=T0) for i in range(6)
    ]
    assert [type(e) for e in entered] == [Admitted] * 4 + [Queued] * 2
    first, second = entered[4], entered[5]
    assert isinstance(first, Queued) and isinstance(second, Queued)
    assert (first.position, second.position) == (1, 2)
    assert (first.wait, second.wait) == (0.5, 1.0)  # one and two places to drain at 2 images a second


async def test_free_fills_only_its_share_and_paid_takes_the_rest(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 8, 1.0, 10, now=T0)
    free = [await fleet.enter(POOL, RULES, "free", f"f{i}", 1, queue="", account_places=1, now=T0) for i in range(8)]
    assert [isinstance(e, Admitted) for e in free] == [True] * 6 + [False] * 2
    paid = [await fleet.enter(POOL, RULES, "pro", f"p{i}", 1, queue="", account_places=1, now=T0) for i in range(3)]
    assert [isinstance(e, Admitted) for e in paid] == [True, True, False]


async def test_a_dead_replicas_places_come_back_when_their_lease_lapses(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 2, 1.0, 100, now=T0)
    held = [await fleet.enter(POOL, RULES, "pro", f"p{i}", 1, queue="", account_places=1, now=T0) for i in range(2)]
    assert all(isinstance(e, Admitted) for e in held)
    assert isinstance(await fleet.enter(POOL, RULES, "pro", "x", 1, queue="", account_places=1, now=T0 + 29), Turned)
    await fleet.renew([held[0].place], now=T0 + 20)  # type: ignore[union-attr]
    after = await fleet.enter(POOL, RULES, "pro", "x", 1, queue="", account_places=1, now=T0 + 31)
    assert isinstance(after, Admitted)  # the unrenewed place lapsed; the renewed one is still held
    assert isinstance(await fleet.enter(POOL, RULES, "pro", "y", 1, queue="", account_places=1, now=T0 + 31), Turned)


async def test_no_live_backend_turns_every_request_away(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 4, 1.0, 3, now=T0)
    assert isinstance(await fleet.enter(POOL, RULES, "pro", "p", 1, queue="sync", account_places=1, now=T0), Admitted)
    gone = await fleet.enter(POOL, RULES, "pro", "p", 1, queue="sync", account_places=1, now=T0 + 4)
    assert gone == Turned("no_capacity", 0)
    await fleet.forget(POOL, "http://a")


async def test_a_ticket_holder_back_at_its_turn_goes_before_newcomers(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 1, 1.0, 100, now=T0)
    held = await fleet.enter(POOL, RULES, "pro", "first", 1, queue="sync", account_places=1, now=T0)
    assert isinstance(held, Admitted)
    waiting = await fleet.enter(POOL, RULES, "pro", "second", 1, queue="sync", account_places=1, now=T0)
    assert isinstance(waiting, Queued) and waiting.wait == 1.0
    early = await fleet.enter(POOL, RULES, "pro", "second", 1, queue="sync", account_places=1, now=T0 + 0.5)
    assert isinstance(early, Queued) and early.ticket == waiting.ticket and early.wait == 0.5
    await fleet.leave([held.place])
    newcomer = await fleet.enter(POOL, RULES, "pro", "third", 1, queue="sync", account_places=1, now=T0 + 1)
    assert isinstance(newcomer, Queued)  # the free place is the ticket holder's
    back = await fleet.enter(POOL, RULES, "pro", "second", 1, queue="sync", account_places=1, now=T0 + 1)
    assert isinstance(back, Admitted)


async def test_a_job_is_claimed_at_its_turn_and_a_cancelled_one_never(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 1, 1.0, 100, now=T0)
    held = await fleet.enter(POOL, RULES, "pro", "a", 1, queue="job", account_places=2, now=T0)
    assert isinstance(held, Admitted)
    one = await fleet.enter(POOL, RULES, "pro", "a", 1, queue="job", account_places=2, now=T0)
    two = await fleet.enter(POOL, RULES, "pro", "a", 1, queue="job", account_places=2, now=T0)
    three = await fleet.enter(POOL, RULES, "pro", "a", 1, queue="job", account_places=2, now=T0)
    assert isinstance(one, Queued) and isinstance(two, Queued) and three == Turned("account_places", 1)
    assert await fleet.claim(POOL, RULES, now=T0) is None  # no place is free
    assert await fleet.position(POOL, RULES, two.ticket, now=T0) == (2, 2.0)
    assert await fleet.cancel(POOL, RULES, one.ticket, now=T0)
    assert not await fleet.cancel(POOL, RULES, one.ticket, now=T0)
    await fleet.leave([held.place])
    claimed = await fleet.claim(POOL, RULES, now=T0 + 1)
    assert claimed is not None and claimed.job == two.ticket
    assert await fleet.position(POOL, RULES, two.ticket, now=T0 + 1) is None


# The property: any sequence of steps keeps the promises above.
step = st.one_of(
    st.tuples(st.just("enter"), st.sampled_from(["free", "pro"]), st.integers(0, 7), st.sampled_from(["sync", "job"])),
    st.tuples(st.just("leave"), st.integers(0, 30)),
    st.tuples(st.just("claim")),
    st.tuples(st.just("wait"), st.floats(0.0, 8.0)),
    st.tuples(st.just("advertise"), st.integers(1, 10)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=20, max_size=80), images=st.lists(st.integers(1, 3), min_size=8, max_size=8))
def test_any_sequence_keeps_the_bounds_and_the_order(redis_url: str, steps: list[Any], images: list[int]) -> None:
    asyncio.run(_play(redis_url, steps, images))


async def _play(redis_url: str, steps: list[Any], images: list[int]) -> None:
    client = connect(redis_url)
    try:
        await client.flushall()
        await _steps(client, steps, images)
    finally:
        await client.aclose()


async def _steps(client: RedisClient, steps: list[Any], images: list[int]) -> None:
    async with Engine(client) as engine:
        fleet = Fleet(engine, place_ttl=30.0)
        now, capacity, other = T0, 4, 2  # two backends: "http://a" grows, "http://b" holds 2
        await fleet.advertise(POOL, "http://a", capacity, 1.0, 1e6, now=now)
        await fleet.advertise(POOL, "http://b", other, 1.0, 1e6, now=now)
        held: list[Admitted] = []
        told: dict[str, list[tuple[float, str]]] = {"free": [], "pro": []}  # (turn, ticket) in arrival order
        for action in steps:
            match action:
                case ("enter", plan, who, queue):
                    got = await fleet.enter(
                        POOL, RULES, plan, f"{plan}{who}", images[who], queue=queue, account_places=JOB_PLACES, now=now
                    )
                    if isinstance(got, Admitted):
                        held.append(got)
                    elif isinstance(got, Queued) and got.ticket not in {t for _, t in told[plan]}:
                        told[plan].append((round((now + got.wait) * 1_000_000), got.ticket))
                case ("leave", index) if held:
                    await fleet.leave([held.pop(index % len(held)).place])
                case ("claim",):
                    claimed = await fleet.claim(POOL, RULES, now=now)
                    if claimed is not None:
                        held.append(Admitted(claimed.place, capacity, claimed.backend))
                case ("wait", seconds):  # the replica holding the places renews them, as the gateway does
                    now += seconds
                    await fleet.renew([a.place for a in held], now=now)
                case ("advertise", size) if size >= capacity:  # growing only: a shrink may leave more held
                    capacity = size
                    await fleet.advertise(POOL, "http://a", capacity, 1.0, 1e6, now=now)
            state = await fleet.state(POOL, RULES, now=now)
            total = capacity + other
            assert state.held == sum(a.place.images for a in held) <= total
            for backend, size in (("http://a", capacity), ("http://b", other)):
                assert sum(a.place.images for a in held if a.backend == backend) <= size
            assert state.plans["free"].held <= math.floor(total * (1 - RULES.reserved_for_paid))
            for plan in ("free", "pro"):
                turns = [turn for turn, _ in told[plan]]
                assert turns == sorted(turns), f"{plan}'s line told a later arrival an earlier turn"
            waiting = await client.hgetall("qg:{pool:diffusion}:waiting")
            assert all(int(v) <= JOB_PLACES for k, v in waiting.items() if k.endswith(b"\njobs"))


async def test_a_place_freed_after_a_turn_waits_for_its_holder_on_the_way_back_then_goes_on(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 1, 1.0, 100, now=T0)
    held = await fleet.enter(POOL, RULES, "pro", "x", 1, queue="sync", account_places=1, now=T0)
    told = await fleet.enter(POOL, RULES, "pro", "s", 1, queue="sync", account_places=1, now=T0)
    job = await fleet.enter(POOL, RULES, "pro", "j", 1, queue="job", account_places=1, now=T0)
    assert isinstance(held, Admitted) and isinstance(told, Queued) and isinstance(job, Queued)
    assert (told.wait, job.wait) == (1.0, 2.0)
    await fleet.leave([held.place])
    # Both turns have come; the sync holder is still within two seconds of its own: its place waits.
    assert await fleet.claim(POOL, RULES, now=T0 + 2.1) is None
    back = await fleet.enter(POOL, RULES, "pro", "s", 1, queue="sync", account_places=1, now=T0 + 2.2)
    assert isinstance(back, Admitted)
    await fleet.leave([back.place])
    assert (await fleet.claim(POOL, RULES, now=T0 + 2.3)) is not None


async def test_a_holder_that_does_not_come_back_in_time_loses_its_precedence_not_its_turn(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 1, 1.0, 100, now=T0)
    held = await fleet.enter(POOL, RULES, "pro", "x", 1, queue="sync", account_places=1, now=T0)
    told = await fleet.enter(POOL, RULES, "pro", "s", 1, queue="sync", account_places=1, now=T0)
    job = await fleet.enter(POOL, RULES, "pro", "j", 1, queue="job", account_places=1, now=T0)
    assert isinstance(held, Admitted) and isinstance(told, Queued) and isinstance(job, Queued)
    await fleet.leave([held.place])
    claimed = await fleet.claim(POOL, RULES, now=T0 + 3.1)  # the holder's turn came 2.1 s ago: the job goes
    assert claimed is not None and claimed.job == job.ticket
    late = await fleet.enter(POOL, RULES, "pro", "s", 1, queue="sync", account_places=1, now=T0 + 3.2)
    assert isinstance(late, Queued) and late.ticket == told.ticket  # still in line, told when a place frees


async def test_a_turn_counts_on_the_drain_left_after_what_higher_plans_take(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 4, 4.0, 100, now=T0)
    for i in range(4):  # pro takes 4 images: about 0.4 a second over the last ten seconds
        assert isinstance(
            await fleet.enter(POOL, RULES, "pro", f"p{i}", 1, queue="", account_places=1, now=T0), Admitted
        )
    told = await fleet.enter(POOL, RULES, "free", "f", 1, queue="sync", account_places=1, now=T0)
    assert isinstance(told, Queued)
    assert told.wait == pytest.approx(1 / (4.0 - 0.4), abs=1e-6)  # not 1 / 4.0: pro keeps taking its share


async def test_a_free_turn_counts_on_the_free_share_not_the_whole_pool(fleet: Fleet) -> None:
    await fleet.advertise(POOL, "http://a", 8, 1.0, 100, now=T0)
    for i in range(6):  # free's share of 8 is 6: all of it taken, 2 places still idle for paid
        assert isinstance(
            await fleet.enter(POOL, RULES, "free", f"f{i}", 1, queue="", account_places=1, now=T0), Admitted
        )
    told = await fleet.enter(POOL, RULES, "free", "next", 1, queue="sync", account_places=1, now=T0)
    assert isinstance(told, Queued) and told.wait == 1.0  # one free image must finish first, not none
