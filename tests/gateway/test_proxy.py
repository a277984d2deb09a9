"""The request path end to end in-process: real Redis, a stub upstream on a real socket."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
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
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(redis_url: str, upstream: StubUpstream, config: Config, registry: CollectorRegistry) -> Iterator[TestClient]:
    app = create_app(settings_for(redis_url, upstream.url, max_body_bytes=4096), config, registry=registry)
    with TestClient(app) as client:
        yield client


@pytest.fixture
async def keys(redis_client: Redis) -> dict[str, str]:
    store = key_store(redis_client)
    return {plan: await store.create_key(f"acct-{plan}", plan) for plan in ("free", "pro")}


def generate(client: TestClient, key: str, n: int = 1, **extra: object) -> httpx.Response:
    body = {"prompt": "a lighthouse", "n": n, "size": "64x64", "response_format": "b64_json", **extra}
    return client.post(PATH, json=body, headers={"Authorization": f"Bearer {key}"})


def requests_total(registry: CollectorRegistry, plan: str, outcome: str) -> float:
    labels = {"plan": plan, "route": PATH, "outcome": outcome}
    return registry.get_sample_value("quotagate_requests_total", labels) or 0.0


async def test_free_plan_gets_three_images_then_an_openai_shaped_429(
    client: TestClient, keys: dict[str, str], registry: CollectorRegistry
) -> None:
    answers = [generate(client, keys["free"]) for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert len(answers[0].json()["data"]) == 1
    refused = answers[3]
    assert refused.json()["error"]["type"] == "insufficient_quota"
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    assert '"free-daily";r=0' in refused.headers["RateLimit"]
    assert '"free-daily";q=3;w=86400' in refused.headers["RateLimit-Policy"]
    assert requests_total(registry, "free", "allowed") == 3
    assert requests_total(registry, "free", "quota_exhausted") == 1


async def test_pro_plan_is_not_stopped_by_a_daily_quota(client: TestClient, keys: dict[str, str]) -> None:
    answers = [generate(client, keys["pro"], n=5) for _ in range(8)]
    assert {a.status_code for a in answers} == {200}
    assert '"pro-daily"' not in answers[-1].headers["RateLimit-Policy"]


async def test_images_are_charged_n_at_a_time(client: TestClient, keys: dict[str, str]) -> None:
    assert generate(client, keys["free"], n=2).status_code == 200
    assert generate(client, keys["free"], n=2).status_code == 429
    assert generate(client, keys["free"], n=1).status_code == 200


async def test_a_request_larger_than_the_quota_is_a_400_not_a_wait(client: TestClient, keys: dict[str, str]) -> None:
    answer = generate(client, keys["free"], n=4)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "n"
    assert "at most 3 images per day" in answer.json()["error"]["message"]


@pytest.mark.parametrize("status", [500, 503, 400])
async def test_failed_upstream_answers_are_refunded(
    client: TestClient, keys: dict[str, str], upstream: StubUpstream, registry: CollectorRegistry, status: int
) -> None:
    upstream.status = status
    upstream.extra_headers = {"Retry-After": "7"}
    failed = generate(client, keys["free"], n=3)
    assert failed.status_code == status
    assert failed.headers["Retry-After"] == "7"  # the backend's own, passed on
    reason = "upstream_error" if status == 500 else "refused"  # a 4xx or the backend's 503: no work taken
    assert registry.get_sample_value("quotagate_images_refunded_total", {"plan": "free", "reason": reason}) == 3

    upstream.status = 200
    assert generate(client, keys["free"], n=3).status_code == 200  # all three images are still there


async def test_with_no_backend_answering_a_request_is_turned_away_uncharged(
    redis_url: str, config: Config, keys: dict[str, str], registry: CollectorRegistry
) -> None:
    app = create_app(settings_for(redis_url, "http://127.0.0.1:9"), config, registry=registry)
    with TestClient(app) as client:
        answer = generate(client, keys["free"], n=3)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "overloaded"
        assert answer.headers["Retry-After"].isdigit()
        assert requests_total(registry, "free", "shed") == 1
        assert generate_quota_left(client, keys["free"]) == 3
    assert registry.get_sample_value("quotagate_images_charged_total", {"plan": "free"}) == 0


def generate_quota_left(client: TestClient, key: str) -> int:
    usage = client.get("/v1/quota", headers={"Authorization": f"Bearer {key}"}).json()
    (daily,) = [limit for limit in usage["limits"] if limit["kind"] == "daily"]
    return int(daily["remaining"])


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Basic abc", "Bearer qg_short", "Bearer qg_0123456789abcdef_" + "0" * 48],
)
async def test_missing_malformed_or_unknown_keys_are_401(client: TestClient, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    answer = client.post(PATH, json={"prompt": "x"}, headers=headers)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"


async def test_a_wrong_secret_for_a_real_key_id_is_401(client: TestClient, keys: dict[str, str]) -> None:
    forged = keys["free"][:-4] + ("0000" if not keys["free"].endswith("0000") else "1111")
    assert generate(client, forged).status_code == 401


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"prompt": "x", "n": 0}', 400, "n"),
        (b'{"prompt": "x", "n": 11}', 400, "n"),
        (b'{"prompt": "x", "n": "2"}', 400, "n"),
        (b'{"prompt": "' + b"x" * 5000 + b'"}', 413, None),
    ],
)
async def test_bad_bodies_get_clear_errors_and_cost_nothing(
    client: TestClient, keys: dict[str, str], upstream: StubUpstream, body: bytes, status: int, param: str | None
) -> None:
    answer = client.post(PATH, content=body, headers={"Authorization": f"Bearer {keys['free']}"})
    assert answer.status_code == status
    assert answer.json()["error"]["param"] == param
    assert upstream.seen == []
    assert generate(client, keys["free"], n=3).status_code == 200  # nothing was charged


async def test_internal_headers_from_clients_are_dropped_and_the_gateway_sets_its_own(
    client: TestClient, keys: dict[str, str], upstream: StubUpstream
) -> None:
    client.post(
        PATH,
        json={"prompt": "x"},
        headers={
            "Authorization": f"Bearer {keys['free']}",
            "X-Quotagate-Priority": "99",
            "X-Quotagate-Plan": "pro",
            "X-Quotagate-Account": "acct-pro",
            "X-Request-Id": "req-1",
        },
    )
    (seen,) = upstream.seen
    assert seen["x-quotagate-priority"] == "0"
    assert seen["x-quotagate-plan"] == "free"
    assert seen["x-quotagate-account"] == "acct-free"  # an account header from an untrusted client is ignored
    assert seen["x-request-id"] == "req-1"
    assert "authorization" not in seen
    assert seen["x-forwarded-for"]


async def test_the_upstream_gets_no_header_the_client_did_not_send_and_no_cookie_of_another_user(
    redis_url: str, upstream: StubUpstream, config: Config, keys: dict[str, str]
) -> None:
    upstream.extra_headers = {"Set-Cookie": "session=of-the-first-user"}
    # By name, not by address: a client's cookie jar (aiohttp's, say) keeps none for an IP address.
    by_name = upstream.url.replace("127.0.0.1", "localhost")
    with TestClient(create_app(settings_for(redis_url, by_name), config)) as client:  # type: ignore[arg-type]
        for name in ("accept", "accept-encoding", "user-agent"):
            del client.headers[name]
        generate(client, keys["free"])
        client.cookies.clear()  # the test client keeps what it was sent; another user's would not have it
        generate(client, keys["pro"])
    first, second = upstream.seen
    for seen in (first, second):
        # A general client adds its own (aiohttp: gzip asked for a client that never said it reads it).
        assert not {"accept", "accept-encoding", "user-agent"} & set(seen)
    assert "cookie" not in second  # the gateway's one client keeps no upstream's cookies


async def test_unrouted_paths_are_404_json(client: TestClient) -> None:
    answer = client.get("/v1/nothing-here")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


async def test_metrics_are_served_in_prometheus_text(client: TestClient, keys: dict[str, str]) -> None:
    generate(client, keys["free"])
    text = client.get("/metrics").text
    assert f'quotagate_requests_total{{outcome="allowed",plan="free",route="{PATH}"}} 1.0' in text
    assert 'quotagate_images_charged_total{plan="free"} 1.0' in text


async def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"


async def test_every_plan_route_and_outcome_is_exported_at_zero_before_traffic(
    client: TestClient, registry: CollectorRegistry
) -> None:
    assert requests_total(registry, "pro", "quota_exhausted") == 0.0
    assert (
        registry.get_sample_value(
            "quotagate_requests_total", {"plan": "pro", "route": PATH, "outcome": "quota_exhausted"}
        )
        == 0.0
    )
    for reason in ("upstream_error", "refused", "withdrawn"):
        assert registry.get_sample_value("quotagate_images_refunded_total", {"plan": "free", "reason": reason}) == 0.0
