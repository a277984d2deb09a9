"""A request's place in its upstream pool, shared by every replica: taken in Redis, or a turn in the line.

The pool holds what its backends advertise (limits/fleet.py keeps the places and the line). A request that
finds no place for its images gets a ticket in its plan's line with the time its turn comes, computed from
its position and the measured drain rate: told by `Retry-After` on a 503 (the account keeps its turn and is
let in when it comes back), or, with `Prefer: respond-async`, run by the fleet as a job at its turn. Higher
plans are served first; within a plan, first come, first served. A request takes its place after its body
is read and before it is decided on: a request that waits costs no quota.

While Redis cannot be reached, each process bounds the pool alone (gateway/admission/shedding.py), and the
plan's `on_store_failure` decides what the decision that follows does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.admission.renewal import Renewal
from gateway.admission.shedding import Shedder, Slot
from gateway.admission.storefailure import CircuitBreaker
from gateway.config.quotas import Config, Plan
from gateway.errors import ConcurrencyLimited, Overloaded
from limits import Admitted, Fleet, LimitsError, LinePlan, Place, PoolRules, Queued, Turned

# Retry-After for a request turned away because no backend is live.
NO_BACKEND_RETRY_S = 5


async def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Held:
    """A request's place: in the fleet's pool, or (Redis unreachable) in this process's bound."""

    pool: str
    place: Place | None
    backend: str | None = None  # the backend its place is on; None (Redis unreachable): the forwarder picks
    slot: Slot | None = None


class PoolPlaces:
    """Takes and gives back places in the pools, and renews those this process holds."""

    def __init__(
        self,
        fleet: Fleet,
        shedder: Shedder,
        breaker: CircuitBreaker,
        *,
        refresh: Callable[[], Awaitable[None]] = _nothing,
    ) -> None:
        self.fleet = fleet
        # Reads the backends' capacity again now (gateway/upstream/capacity.py): when no backend is live for a
        # request, one may have come up since the last poll, or Redis may have lost the readings.
        self._refresh = refresh
        self._shedder = shedder
        self._breaker = breaker  # the store's: while it is open, Redis is not waited on
        self._renewal = Renewal[Place]("pool places", fleet.place_ttl, self._renew_all, self._leave_all)
        self._rules_of: Config | None = None
        self._rules: dict[str, PoolRules] = {}
        self._in_flight: dict[str, int] = defaultdict(int)

    def in_flight(self, pool: str) -> int:
        """Places this process holds in `pool` now."""
        return self._in_flight[pool] + self._shedder.in_flight(pool)

    def rules(self, config: Config, pool: str) -> PoolRules:
        """How `pool` is shared under `config` (worked out once per loaded config)."""
        if config is not self._rules_of:
            self._rules_of, self._rules = config, {}
        rules = self._rules.get(pool)
        if rules is None:
            rules = self._rules[pool] = pool_rules(config, pool)
        return rules

    async def enter(
        self, config: Config, pool: str, plan: Plan, account: str, images: int, *, job: str | None = None
    ) -> Held | Queued:
        """A place of `images` for the request, or (with `job`) the job's ticket in the line.

        Raises Overloaded (503, with the turn's Retry-After) when it must come back, and ConcurrencyLimited when
        the account already has its plan's number of jobs in the line.
        """
        rules = self.rules(config, pool)
        if not self._breaker.allow():
            return self._alone(config, pool, plan)
        try:
            entered = await self._enter(pool, rules, plan, account, images, job)
            if entered == Turned("no_capacity", 0):
                await self._refresh()
                entered = await self._enter(pool, rules, plan, account, images, job)
        except LimitsError:
            self._breaker.failed()
            return self._alone(config, pool, plan)
        self._breaker.succeeded()
        match entered:
            case Admitted(place=place, backend=backend):
                self.hold(place)
                return Held(pool, place, backend)
            case Queued() if job is not None:
                return entered
            case Queued(position=position, wait=wait):
                turn = max(1, math.ceil(wait))
                raise Overloaded(
                    f"The image service is at capacity. You are number {position} in the {plan.name} line; your turn "
                    f"comes in about {turn} s. Retry then and it is yours. You were not charged.",
                    headers={"Retry-After": str(turn), "Quotagate-Line": f"position={position}, wait={turn}"},
                )
            case Turned(reason="account_places"):
                places = plan.concurrency or 1
                raise ConcurrencyLimited(
                    f"This account already holds {places} places in the line, the most the {plan.name} plan allows "
                    "(a turn to come back for, and async jobs); wait for one to start.",
                    headers={"Retry-After": "1"},
                )
            case Turned(reason="too_large", capacity=capacity):
                raise Overloaded(
                    f"This request asks for {images} images; the image service holds at most {capacity} at once "
                    "now. Ask for fewer. You were not charged.",
                    headers={"Retry-After": str(NO_BACKEND_RETRY_S)},
                )
            case Turned(reason="line_full", wait=wait):
                turn = max(1, math.ceil(wait))
                raise Overloaded(
                    f"The image service is at capacity and the {plan.name} line is full ({rules.line_cap} "
                    f"waiting); its last turn comes in about {turn} s. Retry then. You were not charged.",
                    headers={"Retry-After": str(turn)},
                )
            case _:
                raise Overloaded(
                    f"No image service is available right now; retry in {NO_BACKEND_RETRY_S} s. You were not charged.",
                    headers={"Retry-After": str(NO_BACKEND_RETRY_S)},
                )

    async def _enter(
        self, pool: str, rules: PoolRules, plan: Plan, account: str, images: int, job: str | None
    ) -> Admitted | Queued | Turned:
        return await self.fleet.enter(
            pool,
            rules,
            plan.name,
            account,
            images,
            queue="job" if job is not None else "sync",
            account_places=plan.concurrency or 1,
            ticket=job,
        )

    def _alone(self, config: Config, pool: str, plan: Plan) -> Held:
        """A place in this process's own bound on `pool`, while Redis cannot be reached."""
        lowest = plan.priority <= config.lowest_priority
        return Held(pool, None, slot=self._shedder.enter(pool, config.pool(pool), lowest_priority=lowest))

    def hold(self, place: Place) -> None:
        """Renew `place` (taken by `enter`, or a job's claimed by this process) until it is given back."""
        self._in_flight[place.pool] += 1
        self._renewal.hold(place)

    def give_back(self, held: Held) -> None:
        """Free the place soon; never waits, never fails."""
        if held.place is not None:
            self._in_flight[held.place.pool] -= 1
            self._renewal.give_back(held.place)
        if held.slot is not None:
            held.slot.release()

    async def close(self) -> None:
        await self._renewal.close()

    async def _renew_all(self, places: list[Place]) -> None:
        for pool_places in _by_pool(places):
            await self.fleet.renew(pool_places)

    async def _leave_all(self, places: list[Place]) -> None:
        for pool_places in _by_pool(places):
            await self.fleet.leave(pool_places)


def pool_rules(config: Config, pool: str) -> PoolRules:
    """The fleet's rules for `pool` under `config`: its plans, highest priority first, and its bounds."""
    policy = config.pool(pool)
    plans = sorted(config.plans.values(), key=lambda p: -p.priority)
    return PoolRules(
        plans=tuple(LinePlan(p.name, p.priority, p.priority <= config.lowest_priority) for p in plans),
        reserved_for_paid=policy.reserved_for_paid,
        ceiling=policy.max_in_flight,
        line_cap=policy.line_length,
        grace=policy.hold_turn_for,
    )


def _by_pool(places: list[Place]) -> list[list[Place]]:
    pools: dict[str, list[Place]] = defaultdict(list)
    for place in places:
        pools[place.pool].append(place)
    return list(pools.values())
