"""What a test reads back from a running stack: images charged today, and metric samples."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.config.quotas import load_config
from limits import DailyQuota, Engine, connect


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
