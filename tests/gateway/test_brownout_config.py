"""Brownout rules in the quota file: how they read, how a bad one is refused, which plan is in force, what a
refused client reads, and how `config check` lists them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.admission.decision import refusal
from gateway.config.quotas import Config, Plan, parse_config
from gateway.errors import ApiError, BadRequest, ConfigError, QuotaExceeded, RateLimited
from gateway.ops.cli import main
from limits import Engine
from tests.conftest import MakeEngine
from tests.support.quotas import QUOTAS, quotas_yaml
from tests.support.quotas import plan as plan_yaml

pytestmark = pytest.mark.anyio

RULE = """  - name: free-one-a-day
    line: free
    waits_over: 120
    for: 300
    apply: {plan: free, daily_images: 1}
    reason: GPUs saturated
"""
OVERRIDE = "overrides:\n  - {plan: free, daily_images: 2, until: 2026-11-24T00:00:00Z, reason: launch weekend}\n"
TUESDAY = 1_795_478_400.0  # 2026-11-24T00:00:00Z
NOW = TUESDAY - 3600


def with_brownout(rules: str = RULE, extra: str = "") -> str:
    return QUOTAS + extra + "brownout:\n" + rules


def test_a_rule_reads_as_written_and_counts_on_the_plans_own_counters() -> None:
    config = parse_config(with_brownout(), source="q.yaml")
    (rule,) = config.brownouts.values()
    assert (rule.name, rule.line, rule.waits_over_s, rule.for_s, rule.reason) == (
        "free-one-a-day",
        "free",
        120.0,
        300.0,
        "GPUs saturated",
    )
    free = config.plans["free"]
    assert rule.plan.limits.quotas[0].limit == 1 and free.limits.quotas[0].limit == 3
    assert rule.plan.limits.buckets == free.limits.buckets  # what the rule does not set stays the plan's
    assert [(limit.name, limit.counter) for limit in rule.plan.limits] == [
        (limit.name, limit.counter) for limit in free.limits
    ]
    assert rule.plan.temporary is not None and rule.plan.temporary.limits == {"free-daily"}
    assert free.temporary is None


def test_the_plan_in_force_is_the_rules_only_while_it_applies() -> None:
    config = parse_config(with_brownout(), source="q.yaml")
    rule = config.brownouts["free-one-a-day"]
    assert config.plan_at("free", NOW) is config.plans["free"]
    assert config.plan_at("free", NOW, frozenset()) is config.plans["free"]
    assert config.plan_at("free", NOW, {"free-one-a-day"}) is rule.plan
    assert config.plan_at("pro", NOW, {"free-one-a-day"}) is config.plans["pro"]  # a rule changes its plan only
    assert config.plan_at("free", NOW, {"a-rule-reloaded-away"}) is config.plans["free"]


def test_an_override_in_force_comes_before_a_brownout_of_the_same_plan() -> None:
    config = parse_config(with_brownout(extra=OVERRIDE), source="q.yaml")
    applied = {"free-one-a-day"}
    overridden = config.plan_at("free", NOW, applied)
    assert overridden is config.overrides["free"].plan and overridden.limits.quotas[0].limit == 2
    # Once the override lapses, the brownout that still applies is in force.
    assert config.plan_at("free", TUESDAY, applied) is config.brownouts["free-one-a-day"].plan


def test_rules_may_watch_one_line_and_target_other_plans() -> None:
    pro_rule = RULE.replace("free-one-a-day", "pro-slower").replace(
        "{plan: free, daily_images: 1}", "{plan: pro, rate: {images: 10, per: minute, burst: 2}}"
    )
    config = parse_config(with_brownout(RULE + pro_rule), source="q.yaml")
    assert {rule.name: (rule.line, rule.plan.name) for rule in config.brownouts.values()} == {
        "free-one-a-day": ("free", "free"),
        "pro-slower": ("free", "pro"),
    }
    pro = config.plan_at("pro", NOW, {"pro-slower"})
    assert pro is not None and pro.limits.buckets[0].burst == 2 and pro.temporary is not None
    assert pro.temporary.limits == {"pro-rate"}


BAD = {
    "unknown line": (
        with_brownout(RULE.replace("line: free", "line: gold")),
        "q.yaml:17: brownout[0].line: no plan 'gold'; plans: free, pro",
    ),
    "unknown target": (
        with_brownout(RULE.replace("{plan: free,", "{plan: gold,")),
        "q.yaml:20: brownout[0].apply.plan: no plan 'gold'; plans: free, pro",
    ),
    "nothing applied": (
        with_brownout(RULE.replace("{plan: free, daily_images: 1}", "{plan: free}")),
        "q.yaml:20: brownout[0].apply: set daily_images or rate (or both)",
    ),
    "apply not a mapping": (
        with_brownout(RULE.replace("{plan: free, daily_images: 1}", "free")),
        "q.yaml:20: brownout[0].apply: expected a mapping",
    ),
    "apply sets a key an override cannot": (
        with_brownout(RULE.replace("daily_images: 1}", "daily_images: 1, priority: 2}")),
        "q.yaml:20: brownout[0].apply.priority: unknown key; expected one of: daily_images, plan, rate",
    ),
    "bad daily quota": (
        with_brownout(RULE.replace("daily_images: 1}", "daily_images: one}")),
        "q.yaml:20: brownout[0].apply.daily_images: expected a whole number, got 'one'",
    ),
    "bad rate": (
        with_brownout(RULE.replace("daily_images: 1}", "rate: {images: 0, per: minute, burst: 1}}")),
        "q.yaml:20: brownout[0].apply.rate.images: must be at least 1, got 0",
    ),
    "negative wait": (
        with_brownout(RULE.replace("waits_over: 120", "waits_over: -1")),
        "q.yaml:18: brownout[0].waits_over: must be at least 0, got -1",
    ),
    "not a number of seconds": (
        with_brownout(RULE.replace("for: 300", "for: 5m")),
        "q.yaml:19: brownout[0].for: expected a number of seconds, like 300, got '5m'",
    ),
    "not a finite number": (
        with_brownout(RULE.replace("waits_over: 120", "waits_over: .nan")),
        "q.yaml:18: brownout[0].waits_over: expected a number of seconds, like 300, got nan",
    ),
    "no for": (
        with_brownout(RULE.replace("    for: 300\n", "")),
        "q.yaml:16: brownout[0].for: required",
    ),
    "no reason": (
        with_brownout(RULE.replace("    reason: GPUs saturated\n", "")),
        "q.yaml:16: brownout[0].reason: required",
    ),
    "bad name": (
        with_brownout(RULE.replace("free-one-a-day", "Free One")),
        "q.yaml:16: brownout[0].name: names are lowercase letters, digits, - and _",
    ),
    "unknown key": (
        with_brownout(RULE + "    until: 2026-01-01T00:00:00Z\n"),
        "q.yaml:22: brownout[0].until: unknown key; expected one of: apply, for, line, name, reason, waits_over",
    ),
    "two rules of one name": (
        with_brownout(RULE + RULE.replace("{plan: free,", "{plan: pro,")),
        "q.yaml:22: brownout[1].name: free-one-a-day names two rules; names are unique",
    ),
    "two rules for one plan": (
        with_brownout(RULE + RULE.replace("free-one-a-day", "free-again")),
        "q.yaml:22: brownout[1].apply.plan: free is already the target of rule free-one-a-day; keep one rule per plan",
    ),
    "empty": (QUOTAS + "brownout: []\n", "q.yaml:15: brownout: expected a list with at least one entry"),
    "a mapping, not a list": (
        QUOTAS + "brownout: {name: x}\n",
        "q.yaml:15: brownout: expected a list with at least one entry",
    ),
}


@pytest.mark.parametrize("text,message", BAD.values(), ids=BAD.keys())
def test_bad_rules_are_refused_naming_file_line_field_and_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(text, source="q.yaml")
    assert str(refused.value) == message


def test_the_example_in_the_shipped_quota_file_loads_when_uncommented(repo_root: Path) -> None:
    text = (repo_root / "config/quotas.yaml").read_text()
    start = text.index("# brownout:")
    example = "\n".join(line.removeprefix("# ") for line in text[start:].splitlines() if line.startswith("# "))
    config = parse_config(text[:start] + example + "\n", source="quotas.yaml")
    (rule,) = config.brownouts.values()
    assert (rule.line, rule.waits_over_s, rule.for_s, rule.plan.limits.quotas[0].limit) == ("free", 120, 300, 1)


# What a refused client reads: the real engine's refusals, rendered as the gateway renders them.


async def _refusal(engine: Engine, plan: Plan, account: str, costs: list[int]) -> ApiError:
    """The answer to the last of `costs`, charged one after another at NOW; every one before it is admitted."""
    *admitted, last = [await engine.decide(account, plan.limits, cost, now=NOW) for cost in costs]
    assert all(decision.allowed for decision in admitted)
    assert not last.allowed
    return refusal(plan, last)


def _in_force(config: Config, plan: str, applied: set[str]) -> Plan:
    found = config.plan_at(plan, NOW, applied)
    assert found is not None
    return found


async def test_a_refusal_by_a_limit_the_brownout_lowered_names_the_brownout_and_its_reason(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    engine, config = make_engine(redis_client), parse_config(with_brownout(), source="q.yaml")
    plan = _in_force(config, "free", {"free-one-a-day"})
    answer = await _refusal(engine, plan, "ann", [1, 1])
    assert isinstance(answer, QuotaExceeded)
    assert answer.message.startswith("You have used today's 1 images on the free plan.")
    assert answer.message.endswith(" Temporary limit (brownout free-one-a-day): GPUs saturated")
    too_big = await _refusal(engine, plan, "bob", [2])  # more than the lowered day allows: no wait helps
    assert isinstance(too_big, BadRequest) and too_big.message.endswith("(brownout free-one-a-day): GPUs saturated")
    # The same account under the plan's own limits: admitted, and a later refusal blames nothing temporary.
    own = config.plans["free"]
    assert (await engine.decide("ann", own.limits, 2, now=NOW)).allowed
    answer = await _refusal(engine, own, "ann", [1])
    assert answer.message.endswith("or upgrade your plan.") and "Temporary" not in answer.message


async def test_a_refusal_by_a_limit_the_brownout_left_alone_does_not_blame_it(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    text = quotas_yaml(plan_yaml("free", daily=10, rate=1, burst=2), plan_yaml("pro", priority=10))
    config = parse_config(text + "brownout:\n" + RULE.replace("daily_images: 1", "daily_images: 5"), source="q")
    answer = await _refusal(make_engine(redis_client), _in_force(config, "free", {"free-one-a-day"}), "ann", [1, 1, 1])
    assert isinstance(answer, RateLimited) and "Temporary" not in answer.message


async def test_a_refusal_under_a_hand_written_override_gives_its_reason_and_end(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    config = parse_config(with_brownout(extra=OVERRIDE), source="q.yaml")
    plan = _in_force(config, "free", {"free-one-a-day"})
    answer = await _refusal(make_engine(redis_client), plan, "ann", [1, 1, 1])
    assert isinstance(answer, QuotaExceeded) and answer.message.startswith("You have used today's 2 images")
    assert answer.message.endswith(" Temporary limit until 2026-11-24T00:00:00+00:00: launch weekend")
    assert "brownout" not in answer.message


# `quotagate config check`


def test_config_check_lists_the_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "quotas.yaml"
    pro_rule = RULE.replace("free-one-a-day", "pro-slower").replace(
        "{plan: free, daily_images: 1}", "{plan: pro, rate: {images: 10, per: minute, burst: 2}}"
    )
    path.write_text(with_brownout(RULE + pro_rule, extra=OVERRIDE.replace("2026-11-24", "2999-01-01")))
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "  brownout free-one-a-day: while the free line waits over 120 s for 300 s, plan free daily_images 1,"
        " rate 60/60s burst 10: GPUs saturated (the override of plan free in force comes first)\n" in out
    )
    assert (
        "  brownout pro-slower: while the free line waits over 120 s for 300 s, plan pro daily_images unlimited,"
        " rate 10/60s burst 2: GPUs saturated\n" in out
    )
    assert main(["config", "check", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["brownout"] == ["free-one-a-day", "pro-slower"]

    path.write_text(with_brownout(RULE.replace("line: free", "line: gold")))
    assert main(["config", "check", str(path)]) == 1
    assert f"{path}:17: brownout[0].line: no plan 'gold'" in capsys.readouterr().err
