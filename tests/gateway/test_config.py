"""The quota YAML: what loads, and one refusal per failure mode with its exact message."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.quotas import PoolPolicy, load_config, parse_config
from gateway.errors import ConfigError
from limits import Bucket
from tests.support.quotas import QUOTAS


def test_shipped_config_loads_with_free_at_three_images_a_day(repo_root: Path) -> None:
    config = load_config(repo_root / "config" / "quotas.yaml")
    free, pro = config.plans["free"], config.plans["pro"]
    assert free.limits.quotas[0].limit == 3
    assert pro.limits.quotas[0].limit is None
    assert pro.priority > free.priority
    assert config.routes["/v1/images/generations"].cost is None


def test_rates_become_buckets_of_the_stated_period() -> None:
    bucket = parse_config(QUOTAS, source="q.yaml").plans["free"].limits.buckets[0]
    assert bucket == Bucket(name="free-rate", counter="rate", rate=60, period=60, burst=10)
    assert bucket.interval_us == 1_000_000


def test_pools_take_their_policy_and_others_the_defaults() -> None:
    config = parse_config(
        QUOTAS + "pools:\n  diffusion: {max_in_flight: 8, reserved_for_paid: 0.5, eject_for: 2.5}\n", source="q"
    )
    assert config.pool("diffusion") == PoolPolicy(max_in_flight=8, reserved_for_paid=0.5, eject_after=3, eject_for=2.5)
    assert parse_config(QUOTAS, source="q").pool("diffusion") == PoolPolicy()


def test_version_changes_with_the_text() -> None:
    assert parse_config(QUOTAS, source="q").version != parse_config(QUOTAS + "\n# edited\n", source="q").version


BAD = {
    "not yaml": ("plans: [\n", "q.yaml:2: (file): not valid YAML: expected the node content, but found '<stream end>'"),
    "empty": ("", "q.yaml:1: (file): empty; expected `plans` and `routes`"),
    "size weights with a constant cost": (
        QUOTAS.replace("    cost: images\n", "    cost: 1\n    size_weights: {512x512: 2}\n"),
        "q.yaml:15: routes[0].size_weights: only with `cost: images` (a constant cost has no sizes)",
    ),
    "bad size": (
        QUOTAS.replace("    cost: images\n", "    cost: images\n    size_weights: {big: 2}\n"),
        "q.yaml:15: routes[0].size_weights.big: sizes read WIDTHxHEIGHT, like 512x512",
    ),
    "zero weight": (
        QUOTAS.replace("    cost: images\n", "    cost: images\n    size_weights: {512x512: 0}\n"),
        "q.yaml:15: routes[0].size_weights.512x512: must be at least 1, got 0",
    ),
    "pool for no route": (
        QUOTAS + "pools:\n  difusion: {max_in_flight: 8}\n",
        "q.yaml:16: pools.difusion: no route forwards to it; routes forward to: diffusion",
    ),
    "pool share not a number": (  # NaN passes every comparison: it would reach the shedder's floor() and raise
        QUOTAS + "pools:\n  diffusion: {reserved_for_paid: .nan}\n",
        "q.yaml:16: pools.diffusion.reserved_for_paid: expected a number, got nan",
    ),
    "pool share over one": (
        QUOTAS + "pools:\n  diffusion: {reserved_for_paid: 1.5}\n",
        "q.yaml:16: pools.diffusion.reserved_for_paid: must be from 0 to 1, got 1.5",
    ),
    "pool bound zero": (
        QUOTAS + "pools:\n  diffusion: {max_in_flight: 0}\n",
        "q.yaml:16: pools.diffusion.max_in_flight: must be at least 1, got 0",
    ),
    "unknown pool key": (
        QUOTAS + "pools:\n  diffusion: {max_inflight: 8}\n",
        "q.yaml:16: pools.diffusion.max_inflight: unknown key; "
        "expected one of: eject_after, eject_for, hold_turn_for, line_length, max_in_flight, reserved_for_paid",
    ),
    "unknown top key": (
        QUOTAS + "limits: {}\n",
        "q.yaml:15: limits: unknown key; expected one of: brownout, overrides, plans, pools, routes, timezone",
    ),
    "blank key": (
        QUOTAS + '" ": 1\n',
        "q.yaml:15: ' ': unknown key; expected one of: brownout, overrides, plans, pools, routes, timezone",
    ),
    "unknown plan key": (
        QUOTAS.replace("    priority: 0\n", "    priority: 0\n    colour: blue\n"),
        "q.yaml:5: plans.free.colour: unknown key; expected one of: "
        "concurrency, daily_images, on_store_failure, priority, rate, shadow, store_failure_budget",
    ),
    "missing field": (
        QUOTAS.replace("    priority: 0\n", ""),
        "q.yaml:4: plans.free.priority: required",
    ),
    "quota not a number": (
        QUOTAS.replace("daily_images: 3", "daily_images: three"),
        "q.yaml:5: plans.free.daily_images: expected a whole number, got 'three'",
    ),
    "negative quota": (
        QUOTAS.replace("daily_images: 3", "daily_images: -1"),
        "q.yaml:5: plans.free.daily_images: must be at least 0, got -1",
    ),
    "bad period": (
        QUOTAS.replace("per: minute, burst: 10", "per: fortnight, burst: 10"),
        "q.yaml:6: plans.free.rate.per: expected one of second, minute, hour, day, got 'fortnight'",
    ),
    "a rate past one image per microsecond": (
        QUOTAS.replace("rate: {images: 60, per: minute", "rate: {images: 1000001, per: second"),
        "q.yaml:6: plans.free.rate.images: must be at most 1,000,000, got 1,000,001",
    ),
    "zero burst": (
        QUOTAS.replace("burst: 10", "burst: 0"),
        "q.yaml:6: plans.free.rate.burst: must be at least 1, got 0",
    ),
    "bad time zone": (
        QUOTAS.replace("timezone: UTC", "timezone: Mars/Olympus"),
        "q.yaml:1: timezone: unknown IANA time zone 'Mars/Olympus'",
    ),
    "duplicate plan": (
        QUOTAS.replace("  pro:\n", "  free:\n"),
        "q.yaml:7: plans.free: appears twice",
    ),
    "bad plan name": (
        QUOTAS.replace("  pro:\n", "  Pro Plan:\n"),
        "q.yaml:8: plans.Pro Plan: names are lowercase letters, digits, - and _",
    ),
    "route path": (
        QUOTAS.replace("path: /v1/images/generations", "path: v1/images"),
        "q.yaml:12: routes[0].path: must start with /, got 'v1/images'",
    ),
    "route cost": (
        QUOTAS.replace("cost: images", "cost: pixels"),
        "q.yaml:14: routes[0].cost: expected a whole number, got 'pixels'",
    ),
    "no routes": (
        QUOTAS.split("routes:")[0] + "routes: []\n",
        "q.yaml:11: routes: expected a list with at least one entry",
    ),
}


@pytest.mark.parametrize("text,message", BAD.values(), ids=BAD.keys())
def test_bad_config_is_refused_naming_file_line_field_and_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(text, source="q.yaml")
    assert str(refused.value) == message


def test_missing_file_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: No such file or directory"):
        load_config(tmp_path / "nope.yaml")


def test_a_file_that_is_not_utf8_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_bytes(b"timezone: UTC\nplans: \xff\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == f"{path}:2: (file): not UTF-8 text (byte 0xff)"
