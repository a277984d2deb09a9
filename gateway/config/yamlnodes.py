"""Reading a YAML node tree so that every value keeps the line it came from, and every error says where.

Errors read `file:line: field: problem`; the quota file's reader (gateway/config/quotas.py) builds on these.
"""

from __future__ import annotations

import math
import re
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from gateway.errors import ConfigError

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")  # what the file's own names (plans, pools, rules) may be


class NodeReader:
    """Turns YAML nodes into checked values; each error names the file, line, field and problem."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node, field: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}:{node.start_mark.line + 1}: {field}: {problem}")

    def _entries(self, node: yaml.MappingNode, field: str) -> dict[str, yaml.Node]:
        out: dict[str, yaml.Node] = {}
        for key_node, value in node.value:
            key = self.scalar(key_node)
            if not isinstance(key, str):
                raise self.error(key_node, field, f"keys must be text, got {show(key)}")
            if key in out:
                raise self.error(key_node, join(field, key), "appears twice")
            out[key] = value
        return out

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
                raise self.error(value, join(field, key), f"unknown key; expected one of: {allowed}")
        missing = sorted(required - out.keys())
        if missing:
            raise self.error(node, join(field, missing[0]), "required")
        return out

    def named_mapping(self, node: yaml.Node, field: str) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            raise self.error(node, field, "expected a mapping with at least one entry")
        out = self._entries(node, field)
        for name, value in out.items():
            if not NAME.match(name):
                raise self.error(value, join(field, name), "names are lowercase letters, digits, - and _")
        return out

    def sequence(self, node: yaml.Node, field: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(node, field, "expected a list with at least one entry")
        return list(node.value)

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node
        return self._constructor.construct_object(node, deep=True)

    def integer(self, node: yaml.Node, field: str, *, minimum: int, maximum: int | None = None) -> int:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(node, field, f"expected a whole number, got {show(value)}")
        if value < minimum:
            raise self.error(node, field, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(node, field, f"must be at most {maximum:,}, got {value:,}")
        return value

    def number(self, node: yaml.Node, field: str, *, minimum: float, maximum: float | None = None) -> float:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.error(node, field, f"expected a number, got {show(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise self.error(node, field, f"must be {bounds}, got {value}")
        return float(value)

    def string(self, node: yaml.Node, field: str) -> str:
        value = self.scalar(node)
        if not isinstance(value, str) or not value:
            raise self.error(node, field, f"expected text, got {show(value)}")
        return value

    def timezone(self, node: yaml.Node, field: str) -> ZoneInfo:
        name = self.string(node, field)
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise self.error(node, field, f"unknown IANA time zone {name!r}") from exc

    def instant(self, node: yaml.Node, field: str) -> datetime:
        """An ISO 8601 date and time with its UTC offset: a bare time would be ambiguous across zones and DST."""
        expected = "expected a date and time like 2026-11-24T00:00:00+01:00"
        value = self.scalar(node)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError as exc:
                raise self.error(node, field, f"{expected}, got {value!r}") from exc
        if not isinstance(value, datetime):
            shown = value.isoformat() if isinstance(value, date) else show(value)
            raise self.error(node, field, f"{expected}, got {shown}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise self.error(
                node, field, f"{value.isoformat()} has no UTC offset; write it like 2026-11-24T00:00:00+01:00 or ...Z"
            )
        return value


def join(field: str, key: str) -> str:
    if not key.strip() or key != key.strip() or not key.isprintable():
        key = repr(key)  # a blank, padded or unprintable key would not read as a field name
    return key if field == "(file)" else f"{field}.{key}"


def show(value: Any) -> str:
    if isinstance(value, yaml.Node):
        return "a list" if isinstance(value, yaml.SequenceNode) else "a mapping"
    return repr(value)
