"""Load the quota YAML (config/quotas.yaml) into frozen values, once per load.

Unknown keys are refused, and every error reads `file:line: field: problem`. URLs, ports and
secrets are not here: they are environment settings (gateway/config/settings.py).

A temporary override replaces a plan's daily quota or rate until a set instant, then lapses by
itself: the limits in force are a function of the time (`Config.plan_at`), so no reload is needed.
A brownout rule replaces them the same way while the fleet's line for a plan waits too long; whether
it applies now is kept in Redis (gateway/admission/brownout.py) and passed to `Config.plan_at`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from gateway.config.yamlnodes import NAME, NodeReader, show
from gateway.errors import ConfigError
from limits import MAX_RATE_PER_S, PERIODS, Bucket, DailyQuota, LimitSet

MAX_IMAGES_PER_REQUEST = 10  # the OpenAI Images API's bound on `n`

_SIZE = re.compile(r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")
SHADOWABLE = ("daily_images", "rate")  # the plan keys whose limit can be put in shadow mode
MAX_CONCURRENCY = 10_000  # a plan's concurrent requests per account; more than any pool holds


@dataclass(frozen=True, slots=True)
class Temporary:
    """Why a plan's limits are not its own for now (an override or a brownout), told in refusals by those limits."""

    notice: str  # a sentence added to the refusal's message, naming the override or brownout and its reason
    limits: frozenset[str]  # the names of the limits it changed, e.g. free-daily


@dataclass(frozen=True, slots=True)
class Plan:
    """What one plan allows: its limits, in the order the engine charges them, and its priority."""

    name: str
    priority: int
    limits: LimitSet
    # on_store_failure: open admits within this per-replica budget while Redis cannot decide; None: closed (503).
    store_failure_budget: Bucket | None = None
    # Requests of one account in flight at once, across every replica (admission/concurrency.py); None: no limit.
    concurrency: int | None = None
    # Set on the plan an override or a brownout puts in force; None on the plan as the file's `plans:` define it.
    temporary: Temporary | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """A public path forwarded to an upstream pool; `cost` is a constant, or None for the body's `n`.

    With `size_weights`, an image of a listed `size` costs its weight (a body without `size` costs 1 each).
    """

    path: str
    upstream: str
    cost: int | None
    size_weights: Mapping[str, int] | None = None


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """How the fleet shares one upstream pool (`pools:` in the YAML; defaults below).

    The pool's capacity is what its backends advertise (gateway/upstream/capacity.py), bounded by
    `max_in_flight` images fleet-wide where it is set. Plans of the lowest priority may fill only the share
    `1 - reserved_for_paid` of it, so paid plans keep the rest (gateway/admission/places.py). A request that
    finds no place waits its turn in its plan's line, of at most `line_length` tickets; a client told to come
    back keeps its turn `hold_turn_for` seconds past it. An upstream that fails `eject_after` times in a row is
    set aside for `eject_for` seconds (gateway/upstream/forward.py).
    """

    max_in_flight: int | None = None
    reserved_for_paid: float = 0.25
    line_length: int = 10_000
    hold_turn_for: float = 10.0
    eject_after: int = 3
    eject_for: float = 10.0


DEFAULT_POOL = PoolPolicy()


@dataclass(frozen=True, slots=True)
class Override:
    """A plan's limits replaced until `until` (an aware instant), for `reason`."""

    plan: Plan  # the plan as it stands while the override applies
    until: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Brownout:
    """A temporary limit that applies itself: `plan` is in force while the fleet's `line` waits too long.

    It applies once every wait read for `line` has been over `waits_over_s` for `for_s` seconds, and lifts
    once every wait read has been at or under it for `for_s` seconds (gateway/admission/brownout.py).
    """

    name: str
    line: str  # the plan whose wait in the reservation line is watched
    waits_over_s: float
    for_s: float
    plan: Plan  # the target plan as it stands while the rule applies
    reason: str


@dataclass(frozen=True, slots=True)
class Config:
    """One loaded quota file."""

    source: str
    version: str
    timezone: ZoneInfo
    plans: Mapping[str, Plan]
    routes: Mapping[str, Route]  # by path
    overrides: Mapping[str, Override] = field(default_factory=lambda: MappingProxyType({}))  # by plan name
    pools: Mapping[str, PoolPolicy] = field(default_factory=lambda: MappingProxyType({}))  # by upstream pool name
    brownouts: Mapping[str, Brownout] = field(default_factory=lambda: MappingProxyType({}))  # by rule name
    # The priority shed first when a pool is full; worked out once per load, not per request.
    lowest_priority: int = field(init=False)
    # The upstream pools a route forwards to, sorted: those with places and a line; worked out once per load.
    routed_pools: tuple[str, ...] = field(init=False)
    # The brownout rule of each plan a rule targets (one at most): a request looks its plan up here.
    _brownout_of_plan: Mapping[str, Brownout] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lowest_priority", min((p.priority for p in self.plans.values()), default=0))
        object.__setattr__(self, "routed_pools", tuple(sorted({route.upstream for route in self.routes.values()})))
        by_plan = {rule.plan.name: rule for rule in self.brownouts.values()}
        object.__setattr__(self, "_brownout_of_plan", MappingProxyType(by_plan))

    def pool(self, name: str) -> PoolPolicy:
        """The policy of the upstream pool `name` (the defaults if the file names none)."""
        return self.pools.get(name, DEFAULT_POOL)

    def plan_at(self, name: str, now: float, brownouts: Collection[str] = ()) -> Plan | None:
        """The plan `name` as it applies at `now` (seconds since the epoch) while the rules named in `brownouts`
        apply: its override in force first, else its brownout applied, else the plan itself.

        An override wins over a brownout of the same plan: it is ops' explicit, dated decision, and the way to
        relax (or tighten) a brownout by hand without taking its rule out of the file.
        """
        override = self.overrides.get(name)
        if override is not None and now < override.until.timestamp():
            return override.plan
        if brownouts:
            rule = self._brownout_of_plan.get(name)
            if rule is not None and rule.name in brownouts:
                return rule.plan
        return self.plans.get(name)


def load_config(path: Path | str) -> Config:
    """Read and check `path`; raise ConfigError naming the file, line, field and problem."""
    return parse_config(read_config_text(path), source=str(path))


def read_config_text(path: Path | str) -> str:
    """The file's text; ConfigError if it cannot be read or is not UTF-8 (found by fuzzing)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: (file): not UTF-8 text (byte {exc.object[exc.start]:#04x})") from exc


def parse_config(text: str, *, source: str) -> Config:
    """Check the YAML `text` read from `source`."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{source}:{line}: (file): not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    reader = _Reader(source)
    if root is None:
        raise ConfigError(f"{source}:1: (file): empty; expected `plans` and `routes`")
    top = reader.mapping(
        root, "(file)", required={"plans", "routes"}, optional={"timezone", "overrides", "pools", "brownout"}
    )
    timezone = reader.timezone(top["timezone"], "timezone") if "timezone" in top else ZoneInfo("UTC")
    plans = {
        name: reader.plan(node, name, timezone) for name, node in reader.named_mapping(top["plans"], "plans").items()
    }
    routes: dict[str, Route] = {}
    for i, node in enumerate(reader.sequence(top["routes"], "routes")):
        route = reader.route(node, f"routes[{i}]")
        if route.path in routes:
            raise reader.error(node, f"routes[{i}].path", f"{route.path} is routed twice")
        routes[route.path] = route
    overrides: dict[str, Override] = {}
    for i, node in enumerate(reader.sequence(top["overrides"], "overrides") if "overrides" in top else ()):
        override = reader.override(node, f"overrides[{i}]", plans)
        name = override.plan.name
        if name in overrides:
            raise reader.error(node, f"overrides[{i}].plan", f"{name} has two overrides; keep one per plan")
        overrides[name] = override
    pools: dict[str, PoolPolicy] = {}
    for name, node in reader.named_mapping(top["pools"], "pools").items() if "pools" in top else ():
        upstreams = sorted({route.upstream for route in routes.values()})
        if name not in upstreams:
            raise reader.error(
                node, f"pools.{name}", f"no route forwards to it; routes forward to: {', '.join(upstreams)}"
            )
        pools[name] = reader.pool(node, f"pools.{name}")
    brownouts: dict[str, Brownout] = {}
    targets: dict[str, str] = {}  # plan → the rule that targets it
    for i, node in enumerate(reader.sequence(top["brownout"], "brownout") if "brownout" in top else ()):
        rule = reader.brownout(node, f"brownout[{i}]", plans)
        if rule.name in brownouts:
            raise reader.error(node, f"brownout[{i}].name", f"{rule.name} names two rules; names are unique")
        if rule.plan.name in targets:
            raise reader.error(
                node,
                f"brownout[{i}].apply.plan",
                f"{rule.plan.name} is already the target of rule {targets[rule.plan.name]}; keep one rule per plan",
            )
        brownouts[rule.name], targets[rule.plan.name] = rule, rule.name
    return Config(
        source=source,
        version=hashlib.sha256(text.encode()).hexdigest()[:12],
        timezone=timezone,
        plans=MappingProxyType(plans),
        routes=MappingProxyType(routes),
        overrides=MappingProxyType(overrides),
        pools=MappingProxyType(pools),
        brownouts=MappingProxyType(brownouts),
    )


class _Reader(NodeReader):
    """Reads the quota file's own sections: plans, routes, pools, overrides and brownout rules."""

    def plan(self, node: yaml.Node, name: str, timezone: ZoneInfo) -> Plan:
        field = f"plans.{name}"
        entries = self.mapping(
            node,
            field,
            required={"priority", "daily_images", "rate"},
            optional={"shadow", "on_store_failure", "store_failure_budget", "concurrency"},
        )
        priority = self.integer(entries["priority"], f"{field}.priority", minimum=0)
        concurrency = (
            self.integer(entries["concurrency"], f"{field}.concurrency", minimum=1, maximum=MAX_CONCURRENCY)
            if "concurrency" in entries
            else None
        )
        budget = self.store_failure(entries, field, name)
        shadow = self.shadow(entries["shadow"], f"{field}.shadow") if "shadow" in entries else set()
        bucket = self.rate(entries["rate"], f"{field}.rate", name)
        quota = self.daily(entries["daily_images"], f"{field}.daily_images", name, timezone)
        limits = LimitSet(
            buckets=(dataclasses.replace(bucket, shadow="rate" in shadow),),
            quotas=(dataclasses.replace(quota, shadow="daily_images" in shadow),),
        )
        return Plan(name=name, priority=priority, limits=limits, store_failure_budget=budget, concurrency=concurrency)

    def store_failure(self, entries: dict[str, yaml.Node], field: str, plan: str) -> Bucket | None:
        """The fail-open budget if `on_store_failure: open`; None if closed (the default)."""
        mode = (
            self.string(entries["on_store_failure"], f"{field}.on_store_failure")
            if "on_store_failure" in entries
            else "closed"
        )
        if mode not in ("open", "closed"):
            raise self.error(
                entries["on_store_failure"], f"{field}.on_store_failure", f"expected open or closed, got {mode!r}"
            )
        budget = entries.get("store_failure_budget")
        if mode == "closed":
            if budget is not None:
                raise self.error(budget, f"{field}.store_failure_budget", "only with on_store_failure: open")
            return None
        if budget is None:
            raise self.error(
                entries["on_store_failure"],
                f"{field}.store_failure_budget",
                "required with on_store_failure: open, e.g. {images: 30, per: minute, burst: 5}",
            )
        return dataclasses.replace(
            self.rate(budget, f"{field}.store_failure_budget", plan), name=f"{plan}-store-failure"
        )

    def shadow(self, node: yaml.Node, field: str) -> set[str]:
        """The limits of a plan in shadow mode: computed and counted, never enforced."""
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(
                node, field, f"expected a list of limits (daily_images, rate), got {show(self.scalar(node))}"
            )
        names = set()
        for item in node.value:
            name = self.scalar(item)
            if name not in SHADOWABLE:
                raise self.error(item, field, f"expected daily_images or rate, got {show(name)}")
            names.add(name)
        return names

    def rate(self, node: yaml.Node, field: str, plan: str) -> Bucket:
        rate = self.mapping(node, field, required={"images", "per", "burst"})
        per = self.string(rate["per"], f"{field}.per")
        if per not in PERIODS:
            raise self.error(rate["per"], f"{field}.per", f"expected one of {', '.join(PERIODS)}, got {per!r}")
        return Bucket(
            name=f"{plan}-rate",
            counter="rate",
            # The engine counts time in microseconds: at most one unit per microsecond.
            rate=self.integer(rate["images"], f"{field}.images", minimum=1, maximum=PERIODS[per] * MAX_RATE_PER_S),
            period=PERIODS[per],
            burst=self.integer(rate["burst"], f"{field}.burst", minimum=1),
        )

    def daily(self, node: yaml.Node, field: str, plan: str, timezone: ZoneInfo) -> DailyQuota:
        limit = None if self.scalar(node) == "unlimited" else self.integer(node, field, minimum=0)
        return DailyQuota(name=f"{plan}-daily", counter="daily", limit=limit, timezone=timezone)

    def override(self, node: yaml.Node, field: str, plans: Mapping[str, Plan]) -> Override:
        entries = self.mapping(node, field, required={"plan", "until", "reason"}, optional={"daily_images", "rate"})
        plan, changed = self.replaced(node, entries, field, plans)
        until = self.instant(entries["until"], f"{field}.until")
        reason = self.string(entries["reason"], f"{field}.reason")
        notice = Temporary(f"Temporary limit until {until.isoformat()}: {reason}", changed)
        return Override(plan=dataclasses.replace(plan, temporary=notice), until=until, reason=reason)

    def brownout(self, node: yaml.Node, field: str, plans: Mapping[str, Plan]) -> Brownout:
        entries = self.mapping(node, field, required={"name", "line", "waits_over", "for", "apply", "reason"})
        name = self.string(entries["name"], f"{field}.name")
        if not NAME.match(name):
            raise self.error(entries["name"], f"{field}.name", "names are lowercase letters, digits, - and _")
        line = self.string(entries["line"], f"{field}.line")
        if line not in plans:
            raise self.error(entries["line"], f"{field}.line", f"no plan {line!r}; plans: {', '.join(plans)}")
        waits_over = self.seconds(entries["waits_over"], f"{field}.waits_over")
        for_s = self.seconds(entries["for"], f"{field}.for")
        apply = entries["apply"]
        changes = self.mapping(apply, f"{field}.apply", required={"plan"}, optional={"daily_images", "rate"})
        plan, changed = self.replaced(apply, changes, f"{field}.apply", plans)
        reason = self.string(entries["reason"], f"{field}.reason")
        notice = Temporary(f"Temporary limit (brownout {name}): {reason}", changed)
        return Brownout(
            name=name,
            line=line,
            waits_over_s=waits_over,
            for_s=for_s,
            plan=dataclasses.replace(plan, temporary=notice),
            reason=reason,
        )

    def seconds(self, node: yaml.Node, field: str) -> float:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.error(node, field, f"expected a number of seconds, like 300, got {show(value)}")
        return self.number(node, field, minimum=0)

    def replaced(
        self, node: yaml.Node, entries: dict[str, yaml.Node], field: str, plans: Mapping[str, Plan]
    ) -> tuple[Plan, frozenset[str]]:
        """The plan `entries["plan"]` with the daily_images and/or rate `entries` set, and the names of those limits."""
        # The same counters as the plan's own limits, so what was used before the change still counts.
        name = self.string(entries["plan"], f"{field}.plan")
        base = plans.get(name)
        if base is None:
            raise self.error(entries["plan"], f"{field}.plan", f"no plan {name!r}; plans: {', '.join(plans)}")
        if not {"daily_images", "rate"} & entries.keys():
            raise self.error(node, field, "set daily_images or rate (or both)")
        (bucket,), (quota,) = base.limits.buckets, base.limits.quotas
        changed = set()
        # New numbers; whether each limit is enforced or in shadow mode stays the plan's.
        if "rate" in entries:
            bucket = dataclasses.replace(self.rate(entries["rate"], f"{field}.rate", name), shadow=bucket.shadow)
            changed.add(bucket.name)
        if "daily_images" in entries:
            new = self.daily(entries["daily_images"], f"{field}.daily_images", name, quota.timezone)
            quota = dataclasses.replace(new, shadow=quota.shadow)
            changed.add(quota.name)
        limits = LimitSet(buckets=(bucket,), quotas=(quota,))
        return dataclasses.replace(base, limits=limits), frozenset(changed)

    def pool(self, node: yaml.Node, field: str) -> PoolPolicy:
        keys = {"max_in_flight", "reserved_for_paid", "line_length", "hold_turn_for", "eject_after", "eject_for"}
        entries = self.mapping(node, field, required=set(), optional=keys)
        values: dict[str, Any] = {}
        for name in ("max_in_flight", "line_length", "eject_after"):
            if name in entries:
                values[name] = self.integer(entries[name], f"{field}.{name}", minimum=1)
        if "reserved_for_paid" in entries:
            node = entries["reserved_for_paid"]
            values["reserved_for_paid"] = self.number(node, f"{field}.reserved_for_paid", minimum=0, maximum=1)
        for name in ("hold_turn_for", "eject_for"):
            if name in entries:
                values[name] = self.number(entries[name], f"{field}.{name}", minimum=0)
        return PoolPolicy(**values)

    def route(self, node: yaml.Node, field: str) -> Route:
        entries = self.mapping(node, field, required={"path", "upstream", "cost"}, optional={"size_weights"})
        path = self.string(entries["path"], f"{field}.path")
        if not path.startswith("/"):
            raise self.error(entries["path"], f"{field}.path", f"must start with /, got {path!r}")
        upstream = self.string(entries["upstream"], f"{field}.upstream")
        if self.scalar(entries["cost"]) == "images":
            cost = None
        else:
            cost = self.integer(entries["cost"], f"{field}.cost", minimum=0)
        weights = None
        if "size_weights" in entries:
            node = entries["size_weights"]
            if cost is not None:
                raise self.error(
                    node, f"{field}.size_weights", "only with `cost: images` (a constant cost has no sizes)"
                )
            weights = MappingProxyType(
                {
                    size: self.integer(value, f"{field}.size_weights.{size}", minimum=1)
                    for size, value in self.size_names(node, f"{field}.size_weights").items()
                }
            )
        return Route(path=path, upstream=upstream, cost=cost, size_weights=weights)

    def size_names(self, node: yaml.Node, field: str) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            raise self.error(node, field, "expected a mapping of sizes like 512x512 to weights")
        out = self._entries(node, field)
        for size, value in out.items():
            if not _SIZE.match(size):
                raise self.error(value, f"{field}.{size}", "sizes read WIDTHxHEIGHT, like 512x512")
        return out
