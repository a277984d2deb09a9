"""Reliability fixtures: real processes per test, and a check at every test's end that no secret was logged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.admission.identity import KeyStore
from gateway.config.quotas import load_config
from limits import DailyQuota, Engine, connect

from .processes import SECRET, ServiceSet

QUOTAS = """\
timezone: UTC
plans:
  free:
    priority: 0
    daily_images: 3
    rate: {images: 600, per: minute, burst: 100}
  paid:
    priority: 10
    daily_images: 100000
    rate: {images: 100000, per: minute, burst: 10000}
routes:
  - path: /v1/images/generations
    upstream: diffusion
    cost: images
"""
PATH = "/v1/images/generations"


@pytest.fixture
def quotas(tmp_path: Path) -> Path:
    path = tmp_path / "quotas.yaml"
    path.write_text(QUOTAS)
    return path


@pytest.fixture
def services(tmp_path: Path) -> Iterator[ServiceSet]:
    """Processes started by the test; at its end they stop, and no key or secret may be in their logs."""
    started = ServiceSet(tmp_path)
    try:
        yield started
    finally:
        started.stop()
    secrets = [SECRET, *started.secrets]
    leaks = [
        f"{name}: {line[:200]}"
        for name, text in started.logs().items()
        for line in text.splitlines()
        if any(secret in line for secret in secrets)
    ]
    assert not leaks, "secrets in logs:\n" + "\n".join(leaks)


async def create_key(services: ServiceSet, redis_url: str, account: str, plan: str) -> str:
    """A new API key, remembered so that the log check looks for it."""
    redis = connect(redis_url)
    try:
        key = await KeyStore(redis, SECRET.encode()).create_key(account, plan)
    finally:
        await redis.aclose()
    services.secrets.append(key)
    return key


async def images_used(redis_url: str, quotas: Path, account: str, plan: str) -> int:
    """Images charged to `account` today, read with the engine's peek (which charges nothing)."""
    limits = load_config(quotas).plans[plan].limits
    redis = connect(redis_url)
    try:
        async with Engine(redis) as engine:
            decision = await engine.peek(account, limits)
    finally:
        await redis.aclose()
    (daily,) = (state for state in decision.states if isinstance(state.limit, DailyQuota))
    assert daily.limit.limit is not None and daily.remaining is not None
    return daily.limit.limit - daily.remaining


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples in Prometheus text, over those with these label values."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )
