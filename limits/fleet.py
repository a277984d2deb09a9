"""One upstream pool's capacity, shared by every gateway replica: places held as leases, and a line to wait in.

The backends say what they can hold (`advertise`); a request takes a place of its images (`enter`) or, when
none is free for it, a ticket in its plan's line with the time its turn comes (computed from its position and
the measured drain rate). Higher plans are served first; within a plan the line is first come, first served.
A `sync` ticket's holder comes back at its turn (told by Retry-After); a `job` ticket is run by whichever
replica `claim`s it first when its place comes free. Places are leases: the replica that holds one renews it,
so a replica that dies gives its places back within their ttl. All time comes from Redis unless `now` is given.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from limits.engine import Engine
from limits.keys import pool_keys

__all__ = ["Admitted", "Claimed", "Fleet", "LinePlan", "Place", "PoolRules", "PoolState", "Queued", "Turned"]

Queue = Literal["sync", "job", ""]


@dataclass(frozen=True, slots=True)
class LinePlan:
    """A plan as the line sees it: higher `priority` is served first; the `lowest` may fill only their share."""

    name: str
    priority: int
    lowest: bool


@dataclass(frozen=True, slots=True)
class PoolRules:
    """How one pool is shared: its plans (highest priority first), the share kept for paid plans, its bounds."""

    plans: tuple[LinePlan, ...]
    reserved_for_paid: float
    ceiling: int | None  # images in flight fleet-wide at most, whatever the backends advertise
    line_cap: int  # tickets one plan's line holds at most
    grace: float  # seconds a sync ticket is kept past its turn for its holder to come back

    arguments: tuple[Any, ...] = field(init=False, repr=False, compare=False)  # the plans, as the scripts read them
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        args: list[Any] = [len(self.plans)]
        for plan in self.plans:
            args += [plan.name, plan.priority, int(plan.lowest)]
        object.__setattr__(self, "arguments", tuple(args))
        object.__setattr__(self, "names", tuple(plan.name for plan in self.plans))


@dataclass(frozen=True, slots=True)
class Place:
    """A place of some images in `pool`, held until `Fleet.leave` or until it lapses unrenewed."""

    pool: str
    member: str

    @property
    def images(self) -> int:
        return int(self.member.split(":", 1)[0])


@dataclass(frozen=True, slots=True)
class Admitted:
    """A place, on `backend`: the live backend with the most room (each holds at most what it advertised)."""

    place: Place
    capacity: int
    backend: str


@dataclass(frozen=True, slots=True)
class Queued:
    """A ticket in the line: `position` (1 is next) and the seconds until its turn comes."""

    ticket: str
    position: int
    wait: float
    capacity: int
    images_per_s: float


@dataclass(frozen=True, slots=True)
class Turned:
    """No place and no ticket: `no_capacity` (no backend is live), `too_large` (more images than the whole pool
    holds), `no_place` (no line was asked for), `line_full` or `account_places`."""

    reason: str
    capacity: int
    wait: float = 0.0  # line_full: seconds until the line's last turn


@dataclass(frozen=True, slots=True)
class Claimed:
    """An async job whose turn came, with the place it now holds; `late` seconds past its turn (negative: early)."""

    job: str
    place: Place
    late: float
    backend: str


@dataclass(frozen=True, slots=True)
class PlanState:
    held: int  # images this plan holds
    line: int  # tickets in its line
    wait: float  # seconds a newcomer to its line would wait


@dataclass(frozen=True, slots=True)
class PoolState:
    capacity: int
    images_per_s: float
    backends: int  # backends whose reading is live
    held: int
    plans: dict[str, PlanState]


class Fleet:
    """One gateway's handle on the pools' shared places and lines, on the engine's Redis."""

    def __init__(self, engine: Engine, *, place_ttl: float = 30.0) -> None:
        self._engine = engine
        self.place_ttl = place_ttl
        self._keys: dict[tuple[str, tuple[str, ...]], list[str]] = {}  # by pool and plans: built once

    async def advertise(
        self, pool: str, backend: str, images: int, images_per_s: float, ttl: float, *, now: float | None = None
    ) -> None:
        """Record that `backend` can hold `images` and drains `images_per_s`, for `ttl` seconds."""
        rate = f"{max(images_per_s, 0.0):.3f}"
        await self._call("fleet_advertise", pool, (), now, [backend, max(images, 0), rate, _us(ttl)])

    async def forget(self, pool: str, backend: str) -> None:
        """Take `backend` out of the pool's capacity at once (it stopped answering, or was set aside)."""
        await self._call("fleet_advertise", pool, (), None, [backend, "", "", ""])

    async def enter(
        self,
        pool: str,
        rules: PoolRules,
        plan: str,
        account: str,
        images: int,
        *,
        queue: Queue,
        account_places: int,
        ticket: str | None = None,
        now: float | None = None,
    ) -> Admitted | Queued | Turned:
        """A place of `images` for `account`'s request, or its ticket in `plan`'s line, or why neither.

        With `queue` 'sync' the account holds one ticket per line and comes back for its turn; with 'job'
        it may hold `account_places` jobs there; with '' a request that finds no place is turned away.
        """
        token = secrets.token_hex(8)  # the place's id, and the ticket's if it gets one instead
        args = [
            account,
            images,
            token,
            ticket or token,
            queue,
            rules.reserved_for_paid,
            rules.ceiling or 0,
            _us(self.place_ttl),
            _us(rules.grace),
            account_places,
            rules.line_cap,
            plan,
        ]
        reply = await self._call("fleet_enter", pool, rules, now, args)
        if reply[0] == 1:
            return Admitted(Place(pool, _text(reply[1])), reply[2], _text(reply[3]))
        if reply[0] == 0:
            return Queued(_text(reply[1]), reply[2], reply[3] / 1_000_000, reply[4], reply[5] / 1000)
        return Turned(_text(reply[1]), reply[2], reply[3] / 1_000_000 if len(reply) > 3 else 0.0)

    async def claim(self, pool: str, rules: PoolRules, *, now: float | None = None) -> Claimed | None:
        """The first async job whose place has come, now holding it; None if none can start now."""
        args = [rules.reserved_for_paid, rules.ceiling or 0, _us(self.place_ttl)]
        reply = await self._call("fleet_claim", pool, rules, now, args)
        if not reply:
            return None
        late = (reply[3] - reply[2]) / 1_000_000
        return Claimed(_text(reply[0]), Place(pool, _text(reply[1])), late, _text(reply[4]))

    async def orphans(self, pool: str, rules: PoolRules, *, most: int = 16, now: float | None = None) -> list[str]:
        """Async jobs whose place lapsed while they ran (their replica died), each handed to one caller only."""
        return [_text(job) for job in await self._call("fleet_orphans", pool, rules, now, [most]) or []]

    async def cancel(self, pool: str, rules: PoolRules, ticket: str, *, now: float | None = None) -> bool:
        """Take `ticket` out of the line; False if it had left it (its job started, or it lapsed)."""
        return bool(await self._call("fleet_cancel", pool, rules, now, [ticket]))

    async def position(
        self, pool: str, rules: PoolRules, ticket: str, *, now: float | None = None
    ) -> tuple[int, float] | None:
        """`ticket`'s position in its line (1 is next) and the seconds until its turn; None if not in the line."""
        args = [ticket, rules.ceiling or 0, rules.reserved_for_paid]
        reply = await self._call("fleet_position", pool, rules, now, args)
        return (reply[0], reply[1] / 1_000_000) if reply else None

    async def leave(self, places: list[Place]) -> None:
        """Give `places` back (all of one pool)."""
        if places:
            await self._call("fleet_leave", places[0].pool, (), None, [p.member for p in places])

    async def renew(self, places: list[Place], *, now: float | None = None) -> int:
        """Extend `places` (all of one pool) to `place_ttl` from now; how many were still held."""
        if not places:
            return 0
        args = [_us(self.place_ttl), *(p.member for p in places)]
        return int(await self._call("fleet_renew", places[0].pool, (), now, args))

    async def state(self, pool: str, rules: PoolRules, *, now: float | None = None) -> PoolState:
        reply = await self._call("fleet_state", pool, rules, now, [rules.ceiling or 0])
        plans = {}
        for i, plan in enumerate(rules.plans):
            held, line, wait = reply[4 + 3 * i : 7 + 3 * i]
            plans[plan.name] = PlanState(held, line, wait / 1_000_000)
        return PoolState(reply[0], reply[1] / 1000, reply[2], reply[3], plans)

    async def _call(
        self, name: str, pool: str, rules: PoolRules | tuple[()], now: float | None, args: list[Any]
    ) -> Any:
        plans = rules.names if isinstance(rules, PoolRules) else ()
        keys = self._keys.get((pool, plans))
        if keys is None:
            keys = self._keys[(pool, plans)] = pool_keys(pool, list(plans))
        head: list[Any] = [
            "" if now is None else _us(now),
            *(rules.arguments if isinstance(rules, PoolRules) else (0,)),
        ]
        return await self._engine.call_script(name, keys, head + args)


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
