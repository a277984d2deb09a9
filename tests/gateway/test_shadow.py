"""Shadow mode per limit in the quota file: computed and counted in metrics, never enforced."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config.quotas import parse_config
from gateway.errors import ConfigError
from tests.support.keys import key_store
from tests.support.quotas import QUOTAS
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
SHADOW_DAILY = QUOTAS.replace("    daily_images: 3\n", "    daily_images: 3\n    shadow: [daily_images]\n")


def test_shadow_marks_only_the_named_limits() -> None:
    config = parse_config(SHADOW_DAILY, source="q.yaml")
    bucket, quota = config.plans["free"].limits
    assert quota.shadow and not bucket.shadow
    assert not any(limit.shadow for limit in config.plans["pro"].limits)
    both = parse_config(
        QUOTAS.replace("    daily_images: 3\n", "    daily_images: 3\n    shadow: [rate, daily_images]\n"), source="q"
    )
    assert all(limit.shadow for limit in both.plans["free"].limits)


def test_an_override_keeps_the_limit_in_shadow_mode() -> None:
    text = SHADOW_DAILY + "overrides:\n  - {plan: free, daily_images: 1, until: 2999-01-01T00:00:00Z, reason: test}\n"
    overridden = parse_config(text, source="q").overrides["free"].plan.limits.quotas[0]
    assert overridden.limit == 1 and overridden.shadow


@pytest.mark.parametrize(
    "shadow,message",
    [
        ("[priority]", "q.yaml:6: plans.free.shadow: expected daily_images or rate, got 'priority'"),
        ("rate", "q.yaml:6: plans.free.shadow: expected a list of limits (daily_images, rate), got 'rate'"),
        ("true", "q.yaml:6: plans.free.shadow: expected a list of limits (daily_images, rate), got True"),
    ],
)
def test_a_bad_shadow_list_is_refused(shadow: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(
            QUOTAS.replace("    daily_images: 3\n", f"    daily_images: 3\n    shadow: {shadow}\n"), source="q.yaml"
        )
    assert str(refused.value) == message


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(redis_url: str, upstream: StubUpstream, registry: CollectorRegistry) -> Iterator[TestClient]:
    config = parse_config(SHADOW_DAILY, source="q.yaml")
    app = create_app(settings_for(redis_url, upstream.url, config_poll_interval=0), config, registry=registry)
    with TestClient(app) as client:
        yield client


@pytest.fixture
async def free_key(redis_client: Redis) -> str:
    return await key_store(redis_client).create_key("acct-free", "free")


def shadow(registry: CollectorRegistry, plan: str, outcome: str) -> float | None:
    labels = {"plan": plan, "route": PATH, "outcome": outcome}
    return registry.get_sample_value("quotagate_shadow_requests_total", labels)


async def test_a_shadow_quota_admits_past_its_limit_and_counts_what_it_would_have_refused(
    client: TestClient, free_key: str, registry: CollectorRegistry
) -> None:
    answers = [
        client.post(PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {free_key}"}) for _ in range(5)
    ]

    assert [a.status_code for a in answers] == [200] * 5
    assert shadow(registry, "free", "allowed") == 3
    assert shadow(registry, "free", "quota_exhausted") == 2
    assert shadow(registry, "pro", "allowed") == 0  # pro has no shadow limit: not counted
    # A shadow limit is not advertised to clients: it refuses nothing.
    assert "free-daily" not in answers[-1].headers["RateLimit-Policy"]
    assert answers[-1].headers["RateLimit-Policy"].startswith('"free-rate"')
    assert "x-ratelimit-limit-images" not in answers[-1].headers
    assert answers[-1].headers["x-ratelimit-limit-requests"] == "10"


async def test_the_enforced_rate_still_refuses_on_a_plan_with_a_shadow_quota(client: TestClient, free_key: str) -> None:
    headers = {"Authorization": f"Bearer {free_key}"}
    statuses = [client.post(PATH, json={"prompt": "x", "n": 5}, headers=headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # burst 10, so the third 5 is refused by the bucket
