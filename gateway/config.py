"""Load the quota YAML (config/quotas.yaml) into frozen values, once per load.

Unknown keys are refused, and every error reads `file:line: field: problem`. URLs, ports and
secrets are not here: they are environment settings (gateway/settings.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from gateway.errors import ConfigError
from limits import PERIODS, Bucket, DailyQuota, LimitSet

MAX_IMAGES_PER_REQUEST = 10  # the OpenAI Images API's bound on `n`

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


@dataclass(frozen=True, slots=True)
class Plan:
    """What one plan allows: its limits, in the order the engine charges them, and its priority."""

    name: str
    priority: int
    limits: LimitSet


@dataclass(frozen=True, slots=True)
class Route:
    """A public path forwarded to an upstream pool; `cost` is a constant, or None for the body's `n`."""

    path: str
    upstream: str
    cost: int | None


@dataclass(frozen=True, slots=True)
class Config:
    """One loaded quota file."""

    source: str
    version: str
    timezone: ZoneInfo
    plans: Mapping[str, Plan]
    routes: Mapping[str, Route]  # by path


def load_config(path: Path | str) -> Config:
    """Read and check `path`; raise ConfigError naming the file, line, field and problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_config(text, source=str(path))


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
    top = reader.mapping(root, "(file)", required={"plans", "routes"}, optional={"timezone"})
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
    return Config(
        source=source,
        version=hashlib.sha256(text.encode()).hexdigest()[:12],
        timezone=timezone,
        plans=MappingProxyType(plans),
        routes=MappingProxyType(routes),
    )


class _Reader:
    """Walks the YAML node tree, so every value keeps the line it came from."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node, field: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}:{node.start_mark.line + 1}: {field}: {problem}")

    def mapping(
        self,
        node: yaml.Node,
        field: str,
        *,
        required: set[str],
        optional: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, field, "expected a mapping")
        out = self._entries(node, field)
        for key, value in out.items():
            if key not in required | optional:
                allowed = ", ".join(sorted(required | optional))
                raise self.error(value, _join(field, key), f"unknown key; expected one of: {allowed}")
        missing = sorted(required - out.keys())
        if missing:
            raise self.error(node, _join(field, missing[0]), "required")
        return out

    def named_mapping(self, node: yaml.Node, field: str) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            raise self.error(node, field, "expected a mapping with at least one entry")
        out = self._entries(node, field)
        for name, value in out.items():
            if not _NAME.match(name):
                raise self.error(value, _join(field, name), "names are lowercase letters, digits, - and _")
        return out

    def sequence(self, node: yaml.Node, field: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(node, field, "expected a list with at least one entry")
        return list(node.value)

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node
        return self._constructor.construct_object(node, deep=True)

    def integer(self, node: yaml.Node, field: str, *, minimum: int) -> int:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(node, field, f"expected a whole number, got {_show(value)}")
        if value < minimum:
            raise self.error(node, field, f"must be at least {minimum}, got {value}")
        return value

    def string(self, node: yaml.Node, field: str) -> str:
        value = self.scalar(node)
        if not isinstance(value, str) or not value:
            raise self.error(node, field, f"expected text, got {_show(value)}")
        return value

    def timezone(self, node: yaml.Node, field: str) -> ZoneInfo:
        name = self.string(node, field)
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise self.error(node, field, f"unknown IANA time zone {name!r}") from exc

    def plan(self, node: yaml.Node, name: str, timezone: ZoneInfo) -> Plan:
        field = f"plans.{name}"
        entries = self.mapping(node, field, required={"priority", "daily_images", "rate"})
        priority = self.integer(entries["priority"], f"{field}.priority", minimum=0)
        daily_node = entries["daily_images"]
        if self.scalar(daily_node) == "unlimited":
            daily: int | None = None
        else:
            daily = self.integer(daily_node, f"{field}.daily_images", minimum=0)
        rate_field = f"{field}.rate"
        rate = self.mapping(entries["rate"], rate_field, required={"images", "per", "burst"})
        per = self.string(rate["per"], f"{rate_field}.per")
        if per not in PERIODS:
            raise self.error(rate["per"], f"{rate_field}.per", f"expected one of {', '.join(PERIODS)}, got {per!r}")
        bucket = Bucket(
            name=f"{name}-rate",
            counter="rate",
            rate=self.integer(rate["images"], f"{rate_field}.images", minimum=1),
            period=PERIODS[per],
            burst=self.integer(rate["burst"], f"{rate_field}.burst", minimum=1),
        )
        quota = DailyQuota(name=f"{name}-daily", counter="daily", limit=daily, timezone=timezone)
        return Plan(name=name, priority=priority, limits=LimitSet(buckets=(bucket,), quotas=(quota,)))

    def route(self, node: yaml.Node, field: str) -> Route:
        entries = self.mapping(node, field, required={"path", "upstream", "cost"})
        path = self.string(entries["path"], f"{field}.path")
        if not path.startswith("/"):
            raise self.error(entries["path"], f"{field}.path", f"must start with /, got {path!r}")
        upstream = self.string(entries["upstream"], f"{field}.upstream")
        if self.scalar(entries["cost"]) == "images":
            cost = None
        else:
            cost = self.integer(entries["cost"], f"{field}.cost", minimum=0)
        return Route(path=path, upstream=upstream, cost=cost)

    def _entries(self, node: yaml.MappingNode, field: str) -> dict[str, yaml.Node]:
        out: dict[str, yaml.Node] = {}
        for key_node, value in node.value:
            key = self.scalar(key_node)
            if not isinstance(key, str):
                raise self.error(key_node, field, f"keys must be text, got {_show(key)}")
            if key in out:
                raise self.error(key_node, _join(field, key), "appears twice")
            out[key] = value
        return out


def _join(field: str, key: str) -> str:
    return key if field == "(file)" else f"{field}.{key}"


def _show(value: Any) -> str:
    if isinstance(value, yaml.Node):
        return "a list" if isinstance(value, yaml.SequenceNode) else "a mapping"
    return repr(value)
