"""Brownouts: temporary limits that apply themselves while the fleet's line waits too long, and lift themselves.

A rule (`brownout:` in the quota file) watches one plan's wait in the reservation line. It applies
once every wait read has been over `waits_over` for `for` seconds, and lifts once every wait read
has been at or under it for `for` seconds. A read on the other side starts the count again; a wait
that cannot be read (None) changes nothing.

Every replica and worker reads the waits and moves one shared state, a Redis hash, each change made
in a WATCH/MULTI transaction: a tick that raced another's write starts again from what that one
wrote, so all agree on which rules apply, and the waits any of them read all count. Time is Redis's
(TIME), so replicas with skewed clocks count the same seconds; tests pass `now`.

A request never waits on this: `applied()` is this process's copy from its last tick, and
`Config.plan_at(name, now, applied)` gives the plan in force. The replica whose tick applies or lifts
a rule writes the one log line about it; every replica exports `quotagate_brownout_active`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from redis.exceptions import RedisError, WatchError

from gateway.config.quotas import Brownout
from gateway.observe.metrics import GatewayMetrics
from limits import LimitsError, RedisClient

log = logging.getLogger("quotagate.brownout")

KEY = "qg:brownout"  # one hash: a field per rule applied or counting, absent when idle
# Ticks that lose a race this many times in a row leave the state to the next tick.
MAX_ATTEMPTS = 8

WaitOf = Callable[[str], Awaitable[float | None]]  # a plan's wait in the line, in seconds; None: unknown


@dataclass(frozen=True, slots=True)
class RuleState:
    """Where one rule stands: applied or not, and since when the waits read have been against that."""

    applied: bool = False
    since: float | None = None  # start of the run of waits on the other side of the threshold; None: no run
    line: str = ""  # the line the run was counted on

    @property
    def idle(self) -> bool:
        """Not applied and counting nothing: what a missing field means."""
        return not self.applied and self.since is None

    def encode(self) -> str:
        return json.dumps({"applied": self.applied, "since": self.since, "line": self.line})

    @classmethod
    def decode(cls, raw: bytes | str) -> RuleState:
        """The state a field holds; idle if it holds something else (a hand edit), which the next change replaces."""
        try:
            value = json.loads(raw)
            since = value["since"]
            return cls(
                applied=value["applied"] is True,
                since=None if since is None else float(since),
                line=str(value["line"]),
            )
        except (ValueError, TypeError, KeyError):
            return cls()


@dataclass(frozen=True, slots=True)
class Change:
    """A rule applied or lifted by one tick."""

    rule: str
    applied: bool
    at: float
    wait: float | None  # the wait read that completed the run; None: the rule left the quota file


def step(state: RuleState, rule: Brownout, wait: float | None, now: float) -> RuleState:
    """The state of `rule` once `wait` (seconds; None: unknown) has been read at `now`."""
    if state.line != rule.line:  # the rule now watches another line: a run counted on the old one does not count
        state = RuleState(applied=state.applied, line=rule.line)
    if wait is None:
        return state
    against = (wait > rule.waits_over_s) != state.applied
    if not against:
        return dataclasses.replace(state, since=None)
    since = now if state.since is None else state.since
    if now - since >= rule.for_s:
        return RuleState(applied=not state.applied, line=rule.line)
    return dataclasses.replace(state, since=since)


def advance(
    states: Mapping[str, RuleState], rules: Mapping[str, Brownout], waits: Mapping[str, float | None], now: float
) -> tuple[dict[str, RuleState], list[Change]]:
    """Every rule's state after the waits read at `now`, and what changed; idle rules are left out.

    A rule no longer in the file lifts at once: nothing would ever lift it otherwise.
    """
    after: dict[str, RuleState] = {}
    changes: list[Change] = []
    for name, rule in rules.items():
        before = states.get(name, RuleState(line=rule.line))
        wait = waits.get(rule.line)
        state = step(before, rule, wait, now)
        if state.applied != before.applied:
            changes.append(Change(name, state.applied, now, wait))
        if not state.idle:
            after[name] = state
    changes += [Change(name, False, now, None) for name, state in states.items() if name not in rules and state.applied]
    return after, changes


class Brownouts:
    """The brownout rules' shared state: moved by `tick`, read by requests through `applied()`."""

    def __init__(
        self,
        redis: RedisClient,
        rules: Callable[[], Mapping[str, Brownout]],
        wait_of: WaitOf,
        *,
        metrics: GatewayMetrics | None = None,
        key: str = KEY,
    ) -> None:
        self._redis = redis
        self._rules = rules  # the rules of the config in force now (it may be reloaded between ticks)
        self._wait_of = wait_of
        self._metrics = metrics
        self._key = key
        self._applied: frozenset[str] = frozenset()
        self._exported: set[str] = set()
        self._failing = False
        self._export(rules())

    def applied(self) -> frozenset[str]:
        """The rules that applied at this process's last tick (no I/O): pass it to `Config.plan_at`."""
        return self._applied

    async def states(self) -> dict[str, RuleState]:
        """Where each rule that applies or is counting stands in Redis now (a rule left out is idle)."""
        return await read_states(self._redis, key=self._key)

    async def tick(self, now: float | None = None) -> frozenset[str]:
        """Read each watched line's wait, move the shared state, and return the rules that apply.

        `now` is seconds since the epoch; None takes Redis's clock. If Redis cannot be reached, the rules
        that applied stay applied until a tick gets through: nothing is known of the line meanwhile.
        """
        rules = self._rules()
        lines = sorted({rule.line for rule in rules.values()})
        waits = dict(zip(lines, await asyncio.gather(*(self._wait(line) for line in lines)), strict=True))
        try:
            moved = await self._move(rules, waits, now)
        except RedisError as exc:
            self._redis_failed(exc)
            return self._applied
        if self._failing:
            self._failing = False
            log.info("brownout state reachable again")
        if moved is not None:
            states, changes = moved
            self._applied = frozenset(name for name, state in states.items() if state.applied)
            for change in changes:
                _announce(change, rules.get(change.rule))
        self._export(rules)
        return self._applied

    async def watch(self, stop: asyncio.Event, *, every: float = 1.0) -> None:
        """Tick every `every` seconds until `stop` is set (run it as a task)."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # a tick that failed must not end the ticking: the state would freeze unseen
                log.exception("brownout tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    async def _wait(self, line: str) -> float | None:
        try:
            wait = await self._wait_of(line)
        except (RedisError, LimitsError):  # the line's own store is down: its wait is unknown
            if self._metrics is not None:
                self._metrics.redis_errors.labels("brownout").inc()
            return None
        return None if wait is None or math.isnan(wait) else wait

    async def _move(
        self, rules: Mapping[str, Brownout], waits: Mapping[str, float | None], now: float | None
    ) -> tuple[dict[str, RuleState], list[Change]] | None:
        """Advance the shared state in one transaction; None if other ticks kept winning the race."""
        for _ in range(MAX_ATTEMPTS):
            # Redis's clock, read before the WATCH (a cluster refuses TIME inside one): a write by another
            # tick in between is at most one round trip later, and any write after the WATCH starts again.
            if now is None:
                seconds, micros = await self._redis.time()
                at = seconds + micros / 1e6
            else:
                at = now
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self._key)
                    raw = await pipe.hgetall(self._key)
                    before = {_text(name): RuleState.decode(value) for name, value in raw.items()}
                    after, changes = advance(before, rules, waits, at)
                    written = {name: state.encode() for name, state in after.items() if before.get(name) != state}
                    gone = [name for name in before if name not in after]
                    if written or gone:
                        pipe.multi()  # type: ignore[no-untyped-call]
                        if written:  # (redis-py types `mapping` with an invariant key type: str alone fails)
                            pipe.hset(self._key, mapping=written)  # type: ignore[arg-type]
                        if gone:
                            pipe.hdel(self._key, *gone)
                        await pipe.execute()
                    return after, changes
                except WatchError:  # another tick wrote first: read what it wrote and decide again
                    continue
        return None

    def _redis_failed(self, exc: RedisError) -> None:
        if self._metrics is not None:
            self._metrics.redis_errors.labels("brownout").inc()
        if not self._failing:  # once per outage: a tick a second would fill the log
            self._failing = True
            log.warning("brownout state not moved: Redis cannot be reached (%s); applied rules stay applied", exc)

    def _export(self, rules: Mapping[str, Brownout]) -> None:
        if self._metrics is None:
            return
        self._exported |= rules.keys() | self._applied
        for name in self._exported:
            self._metrics.brownout_active.labels(name).set(int(name in self._applied))


async def read_states(redis: RedisClient, *, key: str = KEY) -> dict[str, RuleState]:
    """The shared state, one HGETALL: each rule that applies or is counting (a rule left out is idle)."""
    raw = await redis.hgetall(key)
    return {_text(name): RuleState.decode(value) for name, value in raw.items()}


async def applied_in(redis: RedisClient, *, key: str = KEY) -> frozenset[str]:
    """The rules that apply now, read from Redis: for the commands that run beside the gateways."""
    return frozenset(name for name, state in (await read_states(redis, key=key)).items() if state.applied)


def _announce(change: Change, rule: Brownout | None) -> None:
    fields: dict[str, object] = {"rule": change.rule, "state": "applied" if change.applied else "lifted"}
    if rule is None:
        log.info("brownout %s lifted: its rule is no longer in the quota file", change.rule, extra={"fields": fields})
        return
    fields |= {
        "line": rule.line,
        "wait_s": change.wait,
        "waits_over_s": rule.waits_over_s,
        "for_s": rule.for_s,
        "plan": rule.plan.name,
        "reason": rule.reason,
    }
    if change.applied:
        log.warning(
            "brownout %s applied: the %s line waited over %g s for %g s; the %s plan has temporary limits: %s",
            rule.name,
            rule.line,
            rule.waits_over_s,
            rule.for_s,
            rule.plan.name,
            rule.reason,
            extra={"fields": fields},
        )
    else:
        log.info(
            "brownout %s lifted: the %s line waited %g s or less for %g s; the %s plan's own limits apply again",
            rule.name,
            rule.line,
            rule.waits_over_s,
            rule.for_s,
            rule.plan.name,
            extra={"fields": fields},
        )


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name
