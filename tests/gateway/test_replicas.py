"""Two `quotagate serve` processes sharing one Redis, changed through the `quotagate` admin commands.

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
from pathlib import Path

import httpx
import pytest
import redis

from gateway.embedded_redis import RedisServer
from limits.nearcache import INVALIDATIONS

from .conftest import QUOTAS, SECRET, StubUpstream
from .serve import gateway_processes

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
