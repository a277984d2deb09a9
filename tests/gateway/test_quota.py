"""`GET /v1/quota`: an account reads its plan, usage, what is left and when it resets; nothing is charged."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config.quotas import Config
from tests.support.keys import key_store
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"


@pytest.fixture
def client(redis_url: str, upstream: StubUpstream, config: Config) -> Iterator[TestClient]:
    app = create_app(settings_for(redis_url, upstream.url), config, registry=CollectorRegistry())
    with TestClient(app) as client:
        yield client


async def test_a_free_account_reads_what_it_used_and_when_its_day_resets(
    client: TestClient, redis_client: Redis
) -> None:
    key = await key_store(redis_client).create_key("ann", "free")
    auth = {"Authorization": f"Bearer {key}"}
    assert client.post(PATH, json={"prompt": "x", "n": 2}, headers=auth).status_code == 200

    for _ in range(2):  # reading it twice charges nothing
        answer = client.get("/v1/quota", headers=auth)
        assert answer.status_code == 200
        body = answer.json()
        assert (body["object"], body["account"], body["plan"]) == ("quota", "ann", "free")
        rate, daily = body["limits"]
        assert rate | {"full_in_s": 0} == {
            "name": "free-rate", "kind": "rate", "rate": 60, "per": 60, "burst": 10, "remaining": 8, "full_in_s": 0,
        }  # fmt: skip
        assert 0 < rate["full_in_s"] <= 2
        assert (daily["name"], daily["limit"], daily["used"], daily["remaining"]) == ("free-daily", 3, 2, 1)
        resets_at = datetime.fromisoformat(daily["resets_at"])
        assert (resets_at.hour, resets_at.minute, resets_at.second, resets_at.tzinfo) == (0, 0, 0, UTC)
        assert 0 < daily["resets_in_s"] <= 86400
        assert '"free-daily";r=1' in answer.headers["RateLimit"]
    assert client.post(PATH, json={"prompt": "x"}, headers=auth).status_code == 200  # the last image is still there


async def test_an_unlimited_plan_still_reads_its_usage(client: TestClient, redis_client: Redis) -> None:
    key = await key_store(redis_client).create_key("pat", "pro")
    auth = {"Authorization": f"Bearer {key}"}
    for n in (4, 5):
        assert client.post(PATH, json={"prompt": "x", "n": n}, headers=auth).status_code == 200
    daily = client.get("/v1/quota", headers=auth).json()["limits"][1]
    assert (daily["limit"], daily["used"], daily["remaining"]) == (None, 9, None)


async def test_without_a_key_it_is_a_json_401(client: TestClient) -> None:
    answer = client.get("/v1/quota")
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
