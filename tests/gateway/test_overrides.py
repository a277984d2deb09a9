"""Temporary overrides: a plan's limits replaced until a set instant, then lapsing by themselves."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config.quotas import parse_config
from gateway.config.reload import LiveConfig
from gateway.errors import ConfigError
from gateway.observe.metrics import GatewayMetrics
from gateway.ops.cli import main
from tests.support.keys import key_store
from tests.support.quotas import QUOTAS
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
TUESDAY = datetime.fromisoformat("2026-11-24T00:00:00+01:00")


def with_override(until: str, body: str = "    daily_images: 1\n") -> str:
    return QUOTAS + f"overrides:\n  - plan: free\n{body}    until: {until}\n    reason: launch weekend\n"


def test_an_override_applies_until_its_instant_and_then_lapses_by_itself() -> None:
    config = parse_config(with_override("2026-11-24T00:00:00+01:00"), source="q.yaml")
    before, at = TUESDAY.timestamp() - 1, TUESDAY.timestamp()

    overridden = config.plan_at("free", before)
    assert overridden is not None and overridden.limits.quotas[0].limit == 1
    assert overridden.limits.buckets == config.plans["free"].limits.buckets  # what it does not set stays
    assert config.plan_at("free", at) is config.plans["free"]
    assert config.plan_at("pro", before) is config.plans["pro"]
    assert config.plan_at("nobody", before) is None


def test_an_override_counts_on_the_plans_own_counters() -> None:
    config = parse_config(
        with_override("2026-11-24T00:00:00Z", "    rate: {images: 1, per: hour, burst: 1}\n"), source="q"
    )
    plan = config.plan_at("free", TUESDAY.timestamp())
    overridden = config.overrides["free"].plan
    assert plan is not None
    assert [limit.counter for limit in overridden.limits] == [limit.counter for limit in plan.limits]
    assert [limit.name for limit in overridden.limits] == [limit.name for limit in plan.limits]
    assert overridden.limits.buckets[0].burst == 1 and overridden.limits.quotas[0].limit == 3


def test_an_offset_in_the_text_or_z_is_read_as_written() -> None:
    quoted = parse_config(with_override("'2026-11-24T00:00:00+01:00'"), source="q").overrides["free"].until
    zulu = parse_config(with_override("2026-11-23T23:00:00Z"), source="q").overrides["free"].until
    assert quoted.timestamp() == zulu.timestamp() == TUESDAY.timestamp()


BAD = {
    "no offset": (
        with_override("2026-11-24 00:00:00"),
        "q.yaml:18: overrides[0].until: 2026-11-24T00:00:00 has no UTC offset; "
        "write it like 2026-11-24T00:00:00+01:00 or ...Z",
    ),
    "a date alone": (
        with_override("2026-11-24"),
        "q.yaml:18: overrides[0].until: expected a date and time like 2026-11-24T00:00:00+01:00, got 2026-11-24",
    ),
    "not a time": (
        with_override("tuesday"),
        "q.yaml:18: overrides[0].until: expected a date and time like 2026-11-24T00:00:00+01:00, got 'tuesday'",
    ),
    "unknown plan": (
        with_override("2026-11-24T00:00:00Z").replace("plan: free", "plan: gold"),
        "q.yaml:16: overrides[0].plan: no plan 'gold'; plans: free, pro",
    ),
    "nothing overridden": (
        with_override("2026-11-24T00:00:00Z", ""),
        "q.yaml:16: overrides[0]: set daily_images or rate (or both)",
    ),
    "no reason": (
        with_override("2026-11-24T00:00:00Z").replace("    reason: launch weekend\n", ""),
        "q.yaml:16: overrides[0].reason: required",
    ),
    "unknown key": (
        with_override("2026-11-24T00:00:00Z", "    priority: 3\n"),
        "q.yaml:17: overrides[0].priority: unknown key; expected one of: daily_images, plan, rate, reason, until",
    ),
    "bad quota": (
        with_override("2026-11-24T00:00:00Z", "    daily_images: -2\n"),
        "q.yaml:17: overrides[0].daily_images: must be at least 0, got -2",
    ),
    "two for one plan": (
        with_override("2026-11-24T00:00:00Z")
        + "  - {plan: free, daily_images: 2, until: 2026-11-25T00:00:00Z, reason: again}\n",
        "q.yaml:20: overrides[1].plan: free has two overrides; keep one per plan",
    ),
}


@pytest.mark.parametrize("text,message", BAD.values(), ids=BAD.keys())
def test_bad_overrides_are_refused_naming_file_line_field_and_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(text, source="q.yaml")
    assert str(refused.value) == message


def test_config_check_lists_overrides_in_force_and_expired(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text(
        with_override("2999-01-01T00:00:00Z")
        + "  - {plan: pro, daily_images: 100, until: 2000-01-01T00:00:00Z, reason: old promo}\n"
    )
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "override free: daily_images 1, rate 60/60s burst 10 until 2999-01-01T00:00:00+00:00 (in force)" in out
    assert "override pro: daily_images 100" in out and "(expired: no longer applies): old promo" in out

    path.write_text(with_override("2026-11-24"))
    assert main(["config", "check", str(path)]) == 1
    assert f"{path}:18: overrides[0].until: expected a date and time" in capsys.readouterr().err


# Through the gateway, on the real clock: an override in force, and one that has lapsed.


@pytest.fixture
async def free_key(redis_client: Redis) -> str:
    return await key_store(redis_client).create_key("acct-free", "free")


def gateway(redis_url: str, upstream: StubUpstream, until: datetime) -> TestClient:
    config = parse_config(with_override(until.isoformat()), source="q.yaml")
    return TestClient(create_app(settings_for(redis_url, upstream.url, config_poll_interval=0), config))


def statuses(client: TestClient, key: str, count: int) -> Iterator[int]:
    for _ in range(count):
        yield client.post(PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"}).status_code


async def test_an_override_in_force_is_enforced(redis_url: str, upstream: StubUpstream, free_key: str) -> None:
    with gateway(redis_url, upstream, datetime.now(UTC) + timedelta(days=1)) as client:
        assert list(statuses(client, free_key, 2)) == [200, 429]
        answer = client.post(PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {free_key}"})
        assert '"free-daily";q=1;w=86400' in answer.headers["RateLimit-Policy"]


async def test_a_lapsed_override_is_ignored(redis_url: str, upstream: StubUpstream, free_key: str) -> None:
    with gateway(redis_url, upstream, datetime.now(UTC) - timedelta(seconds=1)) as client:
        assert list(statuses(client, free_key, 4)) == [200, 200, 200, 429]


def test_a_reload_notes_an_override_that_has_ended(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text(QUOTAS)
    live = LiveConfig(parse_config(QUOTAS, source=str(path)), path, GatewayMetrics(CollectorRegistry()))
    path.write_text(with_override("2000-01-01T00:00:00Z"))
    with caplog.at_level(logging.INFO, logger="quotagate.reload"):
        assert live.reload()
    assert "override of plan free ended at 2000-01-01T00:00:00+00:00 and no longer applies" in caplog.text
    assert live.current.plan_at("free", time.time()) is live.current.plans["free"]
