"""Who the gateway believes: accounts vouched for by trusted proxies only, and failed authentications per address."""

from __future__ import annotations

import ipaddress

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.testclient import TestClient

from gateway.admission.authguard import FailedAuthGuard
from gateway.admission.peers import TrustedProxies
from gateway.app import create_app
from gateway.config.addresses import parse_networks
from gateway.config.quotas import Config
from gateway.errors import ConfigError, RateLimited
from tests.conftest import MakeEngine
from tests.support.keys import key_store
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
PROXY = ("10.1.2.3", 5000)
STRANGER = ("192.0.2.7", 5000)


def test_networks_are_parsed_and_bad_entries_named() -> None:
    assert parse_networks("10.0.0.0/8, 127.0.0.1 ::1") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    with pytest.raises(ConfigError, match="QUOTAGATE_TRUSTED_PROXIES: 'example.com' is not an IP"):
        parse_networks("10.0.0.0/8 example.com")


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    proxies = TrustedProxies(parse_networks("10.0.0.0/8"))
    assert proxies.client_address("192.0.2.7", "203.0.113.9") == "192.0.2.7"  # a client naming itself
    assert proxies.client_address("10.1.2.3", "203.0.113.9") == "203.0.113.9"
    # The last hop a trusted proxy did not add is the client; what the client wrote before it is not believed.
    assert proxies.client_address("10.1.2.3", "6.6.6.6, 203.0.113.9, 10.4.4.4") == "203.0.113.9"
    assert proxies.client_address("10.1.2.3", None) == "10.1.2.3"
    assert not TrustedProxies(()).trusts("10.1.2.3")
    assert not proxies.trusts("testclient")


def _app(redis_url: str, upstream: StubUpstream, config: Config, **settings: object) -> Starlette:
    defaults: dict[str, object] = {"trusted_proxies": parse_networks("10.0.0.0/8")}
    return create_app(
        settings_for(redis_url, upstream.url, **{**defaults, **settings}), config, registry=CollectorRegistry()
    )


@pytest.fixture
def gateway(redis_url: str, upstream: StubUpstream, config: Config) -> Starlette:
    return _app(redis_url, upstream, config)


def _client(app: Starlette, peer: tuple[str, int]) -> TestClient:
    return TestClient(app, client=peer)


async def test_a_trusted_proxy_vouches_for_an_account_and_the_header_reaches_no_upstream(
    gateway: Starlette, redis_client: Redis, upstream: StubUpstream
) -> None:
    await key_store(redis_client).set_plan("sso-ann", "pro")
    with _client(gateway, PROXY) as client:
        answer = client.post(PATH, json={"prompt": "x"}, headers={"X-Quotagate-Account": "sso-ann"})
    assert answer.status_code == 200
    assert '"pro-rate"' in answer.headers["RateLimit-Policy"]
    (seen,) = upstream.seen
    assert seen["x-quotagate-account"] == "sso-ann" and seen["x-quotagate-plan"] == "pro"


async def test_an_account_header_from_anyone_else_is_ignored(gateway: Starlette, redis_client: Redis) -> None:
    await key_store(redis_client).set_plan("sso-ann", "pro")
    with _client(gateway, STRANGER) as client:
        answer = client.post(PATH, json={"prompt": "x"}, headers={"X-Quotagate-Account": "sso-ann"})
    assert answer.status_code == 401


async def test_a_custom_account_header_is_stripped_before_the_upstream(
    redis_url: str, upstream: StubUpstream, config: Config, redis_client: Redis
) -> None:
    key = await key_store(redis_client).create_key("ann", "free")
    app = _app(redis_url, upstream, config, account_header="X-Auth-User")
    with _client(app, STRANGER) as client:
        answer = client.post(
            PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}", "X-Auth-User": "someone-else"}
        )
    assert answer.status_code == 200
    (seen,) = upstream.seen
    assert "x-auth-user" not in seen and seen["x-quotagate-account"] == "ann"


async def test_an_address_that_keeps_failing_is_refused_on_every_replica_but_its_good_keys_get_in(
    redis_url: str, upstream: StubUpstream, config: Config, redis_client: Redis
) -> None:
    key = await key_store(redis_client).create_key("ann", "free")
    bad = {"Authorization": "Bearer qg_0123456789abcdef_" + "0" * 48}
    replicas = [_app(redis_url, upstream, config, auth_failures_per_minute=3) for _ in range(2)]
    with _client(replicas[0], STRANGER) as one, _client(replicas[1], STRANGER) as other:
        assert [one.post(PATH, json={}, headers=bad).status_code for _ in range(2)] == [401, 401]
        assert other.post(PATH, json={}, headers=bad).status_code == 401  # the third failure, counted together
        refused = other.post(PATH, json={}, headers=bad)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["Retry-After"]) >= 1
        # Only failures are refused: a good key from the same address (a NAT, a load balancer) gets in.
        assert other.post(PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert other.post(PATH, json={}, headers=bad).status_code == 429
    # Another address is unaffected.
    with _client(replicas[1], ("192.0.2.8", 1)) as neighbour:
        assert neighbour.post(PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"}).status_code == 200


async def test_a_blocked_address_is_let_in_again_once_its_bucket_refills(
    redis_client: Redis, make_engine: MakeEngine
) -> None:
    clock = [100.0]
    guard = FailedAuthGuard(make_engine(redis_client), 2, clock=lambda: clock[0])
    now = 1_800_000_000.0
    assert await guard.failed("192.0.2.7", now=now) is None
    assert await guard.failed("192.0.2.7", now=now) is None
    blocked = await guard.failed("192.0.2.7", now=now)
    assert isinstance(blocked, RateLimited) and blocked.headers["Retry-After"] == "30"  # 2 a minute: one per 30 s
    # Blocked here: a further failure is refused at once, without asking Redis.
    assert isinstance(await guard.failed("192.0.2.7", now=now), RateLimited)
    clock[0] += 30
    assert await guard.failed("192.0.2.7", now=now + 30) is None  # no longer blocked, and its bucket has one again
