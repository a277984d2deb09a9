"""Two `quotagate serve` processes sharing one Redis, changed through the `quotagate` admin commands,
read by the official `openai` client, and in front of a backend killed mid-request.

Each caches identities for an hour here, so only the invalidation can make a revocation or a plan
change show; the test waits for it with a bound that only catches a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from gateway.admission.ratelimit_headers import DAILY_RESET_SPREAD_S
from gateway.ops.embedded_redis import RedisServer
from limits.nearcache import INVALIDATIONS
from tests.support.keys import SECRET
from tests.support.processes import gateway_processes
from tests.support.quotas import QUOTAS
from tests.support.upstream import StubUpstream, upstream_process

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PATH = "/v1/images/generations"
HANG = 10.0  # seconds; a bound on a hang, not a timing assertion


@pytest.fixture(scope="module")
def admin_env(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    config = tmp_path_factory.mktemp("replicas") / "quotas.yaml"
    config.write_text(QUOTAS)
    return {
        **os.environ,
        "QUOTAGATE_REDIS_URL": redis_server.url,
        "QUOTAGATE_KEY_SECRET": SECRET.decode(),
        "QUOTAGATE_CONFIG": str(config),
    }


@pytest.fixture(scope="module")
def gateways(
    admin_env: dict[str, str], _stub_server: StubUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[str]]:
    """Two gateway processes, each ready and following invalidations (the Redis is flushed per test)."""
    redis_url, config = admin_env["QUOTAGATE_REDIS_URL"], Path(admin_env["QUOTAGATE_CONFIG"])
    logs = tmp_path_factory.mktemp("replica-logs")
    with gateway_processes(2, config, redis_url, _stub_server.url, logs, QUOTAGATE_KEY_CACHE_TTL="3600") as running:
        deadline = time.monotonic() + HANG
        with redis.Redis.from_url(redis_url) as client:
            while client.pubsub_numsub(INVALIDATIONS)[0][1] != 2:
                assert time.monotonic() < deadline, "the gateways never subscribed"
                time.sleep(0.02)
        yield [gateway.url for gateway in running]


@pytest.fixture(autouse=True)
def _capacity_advertised(gateways: list[str], redis_url: str) -> None:
    """Each test's Redis starts empty: wait for the gateways' next capacity poll to record the backend again."""
    deadline = time.monotonic() + HANG
    with redis.Redis.from_url(redis_url) as client:
        while not client.exists("qg:{pool:diffusion}:backends"):
            assert time.monotonic() < deadline, "the gateways never advertised the backend's capacity"
            time.sleep(0.02)


def _admin(env: dict[str, str], *args: str) -> dict[str, str]:
    done = subprocess.run([BIN / "quotagate", *args, "--json"], env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


def _generate(url: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}{PATH}", json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"})


def _until_every(urls: list[str], key: str, check) -> float:  # type: ignore[no-untyped-def]
    """Seconds until `check(answer)` holds on every gateway."""
    started = time.monotonic()
    pending = list(urls)
    while pending:
        assert time.monotonic() - started < HANG, f"{pending} never saw the change"
        pending = [url for url in pending if not check(_generate(url, key))]
    return time.monotonic() - started


def test_a_revoked_key_is_refused_by_every_gateway(
    gateways: list[str], admin_env: dict[str, str], redis_url: str, upstream: StubUpstream
) -> None:
    key = _admin(admin_env, "keys", "create", "ann", "--plan", "pro")["key"]
    kept = _admin(admin_env, "keys", "create", "ann", "--plan", "pro")["key"]
    assert [_generate(url, key).status_code for url in gateways] == [200, 200]  # now cached by both

    key_id = key.split("_")[1]
    listed = subprocess.run(
        [BIN / "quotagate", "keys", "list", "ann"], env=admin_env, capture_output=True, text=True, check=True
    )
    assert key_id in listed.stdout and kept.split("_")[1] in listed.stdout and "_" not in listed.stdout

    assert _admin(admin_env, "keys", "revoke", key_id) == {"revoked": key_id, "account": "ann"}
    _until_every(gateways, key, lambda answer: answer.status_code == 401)
    assert [_generate(url, kept).status_code for url in gateways] == [200, 200]


def test_a_plan_change_reaches_every_gateway(
    gateways: list[str], admin_env: dict[str, str], redis_url: str, upstream: StubUpstream
) -> None:
    key = _admin(admin_env, "keys", "create", "bob", "--plan", "free")["key"]
    assert all('"free-daily"' in _generate(url, key).headers["RateLimit-Policy"] for url in gateways)

    _admin(admin_env, "plan", "set", "bob", "pro")
    _until_every(gateways, key, lambda answer: '"pro-rate"' in answer.headers["RateLimit-Policy"])


def test_the_openai_client_gets_rate_limit_error_with_every_header_across_gateways(
    gateways: list[str], admin_env: dict[str, str], redis_url: str, upstream: StubUpstream
) -> None:
    key = _admin(admin_env, "keys", "create", "cat", "--plan", "free")["key"]
    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=HANG) for url in gateways]
    try:
        for client in (clients[0], clients[1], clients[0]):  # the three free images, from either gateway
            assert client.images.generate(prompt="x", n=1, response_format="b64_json").data
        for client in clients:
            with pytest.raises(openai.RateLimitError) as refused:
                client.images.generate(prompt="x", n=1, response_format="b64_json")
            assert refused.value.code == "insufficient_quota"
            headers = refused.value.response.headers
            reset = int(headers["RateLimit"].split('"free-daily";r=0;t=')[1].split(",")[0])
            assert reset <= int(headers["Retry-After"]) <= reset + DAILY_RESET_SPREAD_S
            assert '"free-daily";q=3;w=86400' in headers["RateLimit-Policy"]
            assert (headers["x-ratelimit-limit-images"], headers["x-ratelimit-remaining-images"]) == ("3", "0")
            assert headers["x-ratelimit-limit-requests"] == "10" and headers["x-ratelimit-reset-images"].endswith("s")
    finally:
        for client in clients:
            client.close()
    assert len(upstream.seen) == 3


def test_a_backend_killed_mid_request_is_refunded_by_every_gateway(
    admin_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    key = _admin(admin_env, "keys", "create", "dan", "--plan", "free")["key"]
    auth = {"Authorization": f"Bearer {key}"}
    config = Path(admin_env["QUOTAGATE_CONFIG"])
    with (
        upstream_process("hold") as (backend, backend_url),
        gateway_processes(2, config, redis_url, backend_url, tmp_path) as gws,
    ):
        with ThreadPoolExecutor(2) as pool:
            body = {"prompt": "x", "n": 1}
            pending = [pool.submit(httpx.post, gw.url + PATH, json=body, headers=auth, timeout=HANG) for gw in gws]
            assert backend.stdout is not None
            assert [backend.stdout.readline().strip() for _ in gws] == ["arrived", "arrived"]  # both charged, waiting
            backend.kill()
            answers = [p.result(timeout=HANG) for p in pending]
        assert [(a.status_code, a.json()["error"]["code"]) for a in answers] == [(502, "upstream_error")] * 2
        daily = httpx.get(f"{gws[1].url}/v1/quota", headers=auth).json()["limits"][1]
    assert (daily["used"], daily["remaining"]) == (0, 3)  # both images given back
