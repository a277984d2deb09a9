"""The admin API and the `quotagate usage|grant|reset|config check` commands, against a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.config.quotas import parse_config
from gateway.ops.admin import create_admin_app
from limits import Engine
from tests.ports import free_port
from tests.support.keys import SECRET, key_store
from tests.support.processes import gateway_processes
from tests.support.quotas import QUOTAS
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

FREE = parse_config(QUOTAS, source="quotas.yaml").plans["free"].limits
TOKEN = "admin-token-for-the-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def admin(redis_url: str, quota_file: Path) -> Iterator[TestClient]:
    settings = settings_for(redis_url, "http://127.0.0.1:9", config_path=quota_file)
    with TestClient(create_admin_app(settings, TOKEN.encode())) as client:
        yield client


@pytest.fixture
async def accounts(redis_client: Redis) -> dict[str, str]:
    """Keys of `ann` (free) and `pia` (pro)."""
    store = key_store(redis_client)
    return {"ann": await store.create_key("ann", "free"), "pia": await store.create_key("pia", "pro")}


async def _spend(redis_client: Redis, account: str, images: int) -> None:
    """Charge `images` against the free plan as the gateway would."""
    async with Engine(redis_client) as engine:
        assert (await engine.decide(account, FREE, images)).allowed


def _daily(usage: dict[str, object]) -> dict[str, object]:
    return next(limit for limit in usage["limits"] if limit["kind"] == "daily")  # type: ignore[attr-defined,index]


async def test_usage_grant_and_reset(admin: TestClient, redis_client: Redis, accounts: dict[str, str]) -> None:
    await _spend(redis_client, "ann", 2)
    usage = admin.get("/v1/accounts/ann/usage", headers=AUTH).json()
    assert usage["account"] == "ann" and usage["plan"] == "free"
    assert _daily(usage) | {"resets_in_s": 0, "resets_at": ""} == {
        "name": "free-daily",
        "kind": "daily",
        "limit": 3,
        "timezone": "UTC",
        "used": 2,
        "remaining": 1,
        "resets_in_s": 0,
        "resets_at": "",
    }
    granted = admin.post("/v1/accounts/ann/grant", json={"images": 5}, headers=AUTH).json()
    assert _daily(granted)["remaining"] == 6 and granted["granted_today"] == 5
    reset = admin.post("/v1/accounts/ann/reset", headers=AUTH).json()
    assert _daily(reset)["remaining"] == 3
    assert _daily(admin.get("/v1/accounts/ann/usage", headers=AUTH).json())["remaining"] == 3


async def test_refusals_are_openai_shaped(admin: TestClient, accounts: dict[str, str]) -> None:
    def error(answer: httpx.Response) -> tuple[int, str | None]:
        return answer.status_code, answer.json()["error"]["code"]

    assert error(admin.get("/v1/accounts/nobody/usage", headers=AUTH)) == (404, "not_found")
    assert admin.post("/v1/accounts/ann/grant", json={"images": 0}, headers=AUTH).status_code == 400
    assert admin.post("/v1/accounts/ann/grant", content=b"{", headers=AUTH).status_code == 400
    refused = admin.post("/v1/accounts/pia/grant", json={"images": 1}, headers=AUTH)
    assert refused.status_code == 400 and "no daily limit" in refused.json()["error"]["message"]
    assert error(admin.get("/v1/elsewhere", headers=AUTH)) == (404, "not_found")


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-of-enough-length", f"Basic {TOKEN}", "Bearer "])
async def test_no_token_no_answer(admin: TestClient, accounts: dict[str, str], header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for answer in (
        admin.get("/v1/accounts/ann/usage", headers=headers),
        admin.post("/v1/accounts/ann/reset", headers=headers),
    ):
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.slow
async def test_the_admin_api_has_its_own_port_and_never_the_public_one(
    tmp_path: Path, quota_file: Path, redis_url: str, upstream: StubUpstream, accounts: dict[str, str]
) -> None:
    admin_port = free_port()
    args = ("--admin-port", str(admin_port))
    with gateway_processes(
        1, quota_file, redis_url, upstream.url, tmp_path, args=args, QUOTAGATE_ADMIN_TOKEN=TOKEN
    ) as (gateway,):
        async with httpx.AsyncClient() as client:
            admin_url = f"http://127.0.0.1:{admin_port}"
            assert (await client.get(f"{admin_url}/v1/accounts/ann/usage", headers=AUTH)).json()["plan"] == "free"
            assert (await client.get(f"{admin_url}/v1/accounts/ann/usage")).status_code == 401
            for path in ("/v1/accounts/ann/usage", "/admin/v1/accounts/ann/usage"):
                public = await client.get(f"{gateway.url}{path}", headers=AUTH)
                assert public.status_code == 404 and "plan" not in public.text
            assert (await client.post(f"{gateway.url}/v1/accounts/ann/reset", headers=AUTH)).status_code == 404
            assert (await client.get(f"{admin_url}/metrics", headers=AUTH)).status_code == 404
    assert TOKEN not in gateway.logged()


@pytest.mark.slow
def test_an_admin_port_without_a_token_is_refused_at_start(quota_file: Path, redis_url: str) -> None:
    refused = _quotagate(
        "serve", "--config", str(quota_file), "--redis-url", redis_url, "--upstream", "diffusion=http://127.0.0.1:9",
        "--admin-port", "0", env={"QUOTAGATE_ADMIN_TOKEN": "short"},
    )  # fmt: skip
    assert refused.returncode == 1
    assert "QUOTAGATE_ADMIN_TOKEN: the admin API needs a token of at least 16 bytes" in refused.stderr
    assert "short" not in refused.stderr


def _quotagate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "QUOTAGATE_KEY_SECRET": SECRET.decode(), **(env or {})}
    command = [sys.executable, "-m", "gateway.ops.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=60)


@pytest.mark.slow
async def test_usage_grant_and_reset_commands(
    quota_file: Path, redis_url: str, redis_client: Redis, accounts: dict[str, str]
) -> None:
    await _spend(redis_client, "ann", 3)
    target = ("--redis-url", redis_url, "--config", str(quota_file))
    usage = json.loads(_quotagate("usage", "ann", *target, "--json").stdout)
    assert _daily(usage)["remaining"] == 0
    granted = json.loads(_quotagate("grant", "ann", "2", *target, "--json").stdout)
    assert _daily(granted)["remaining"] == 2 and granted["granted_today"] == 2
    text = _quotagate("usage", "ann", *target).stdout
    assert text.startswith("ann (plan free)") and "2 left of 3" in text
    reset = json.loads(_quotagate("reset", "ann", *target, "--json").stdout)
    assert _daily(reset)["remaining"] == 3
    unknown = _quotagate("usage", "nobody", *target)
    assert unknown.returncode == 1 and unknown.stderr.strip() == "quotagate: no account 'nobody'"
    pro = _quotagate("grant", "pia", "1", *target)
    assert pro.returncode == 1 and "the pro plan has no daily limit" in pro.stderr


@pytest.mark.slow
def test_config_check_answers_in_json_too(tmp_path: Path, quota_file: Path) -> None:
    ok = _quotagate("config", "check", str(quota_file), "--json")
    assert ok.returncode == 0
    assert json.loads(ok.stdout) | {"version": ""} == {
        "file": str(quota_file),
        "ok": True,
        "version": "",
        "plans": ["free", "pro"],
        "routes": ["/v1/images/generations"],
        "brownout": [],
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUOTAS.replace("daily_images: 3", "daily_images: three"))
    for extra in ((), ("--json",)):
        refused = _quotagate("config", "check", str(bad), *extra)
        assert refused.returncode == 1
        problem = f"{bad}:5: plans.free.daily_images: expected a whole number, got 'three'"
        if extra:
            assert json.loads(refused.stdout) == {"file": str(bad), "ok": False, "error": problem}
        else:
            assert refused.stderr.strip() == f"quotagate: {problem}"


@pytest.mark.slow
async def test_the_admin_api_follows_the_quota_file_and_keeps_the_last_good_one(
    admin: TestClient, quota_file: Path, accounts: dict[str, str]
) -> None:
    def daily_limit() -> object:
        return _daily(admin.get("/v1/accounts/ann/usage", headers=AUTH).json())["limit"]

    assert daily_limit() == 3
    await asyncio.to_thread(quota_file.write_text, QUOTAS.replace("daily_images: 3", "daily_images: 5"))
    assert daily_limit() == 5
    await asyncio.to_thread(quota_file.write_text, "plans: [not a quota file\n")
    assert daily_limit() == 5
