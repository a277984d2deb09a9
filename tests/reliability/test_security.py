"""What must never leak: keys into logs, client-sent internal headers or credentials into the backend.

Every test of this package also checks, at its end, that no key it made and no secret appears in any
log of any process it started (the `services` fixture); here the gateway is driven down every path
that logs, so that check is not vacuous.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port
from tests.support.processes import ServiceSet
from tests.support.quotas import IMAGES as PATH

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BODY = {"prompt": "a lighthouse", "n": 1}


def seen_headers(services: ServiceSet) -> list[dict[str, str]]:
    """The headers of every request the stub received."""
    return [json.loads(line) for line in (services.tmp / "stub.seen.jsonl").read_text().splitlines()]


async def test_client_sent_internal_headers_and_credentials_never_reach_the_backend(
    services: ServiceSet, quotas: Path, redis_url: str
) -> None:
    stub = services.stub_upstream()
    gateway = services.gateway("gateway", quotas, redis_url, stub.url)
    stub.wait_ready()
    gateway.wait_ready()
    key = await services.create_key(redis_url, "sneaky", "free")
    forged = {
        "Authorization": f"Bearer {key}",
        "X-Quotagate-Priority": "100",
        "X-Quotagate-Plan": "paid",
        "x-quotagate-account": "someone-else",
        "X-QUOTAGATE-TRUSTED": "1",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Cookie": "session=abc",
    }
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        answer = await client.post(PATH, json=BODY, headers=forged)

        # No key, only a forged account header: this peer is no trusted proxy, so it is not believed.
        unkeyed = await client.post(PATH, json=BODY, headers={"X-Quotagate-Account": "paid-customer"})
    assert answer.status_code == 200
    assert unkeyed.status_code == 401

    (received,) = seen_headers(services)
    # The gateway's own values, from the key's account and plan; none of the client's.
    assert received["x-quotagate-priority"] == "0"
    assert received["x-quotagate-plan"] == "free"
    assert received.get("x-quotagate-account", "sneaky") == "sneaky"
    assert "x-quotagate-trusted" not in received
    assert "authorization" not in received and "proxy-authorization" not in received
    assert key not in json.dumps(received)


async def test_no_key_or_secret_is_logged_on_any_path(services: ServiceSet, quotas: Path, redis_url: str) -> None:
    stub = services.stub_upstream()
    gateway = services.gateway("gateway", quotas, redis_url, stub.url, {"QUOTAGATE_LOG_FORMAT": "json"})
    stub.wait_ready()
    gateway.wait_ready()
    free = await services.create_key(redis_url, "free-user", "free")
    paid = await services.create_key(redis_url, "paid-user", "paid")
    key_id, secret = free.split("_")[1:]
    wrong_secret = f"qg_{key_id}_{secret[::-1]}"
    services.secrets += [secret, wrong_secret]

    async with httpx.AsyncClient(base_url=gateway.url) as client:

        async def post(authorization: str, body: object = BODY) -> int:
            answer = await client.post(PATH, json=body, headers={"Authorization": authorization})
            return answer.status_code

        statuses = [
            *[await post(f"Bearer {free}") for _ in range(4)],  # 3 images, then 429
            await post(f"Bearer {paid}"),
            await post(f"Bearer {paid}", {"n": "many"}),  # 400, refused before charging
            await post(f"Bearer {paid}", {"n": 1}),  # the stub's 400: charged, then refunded
            await post(f"Bearer {wrong_secret}"),  # a real key id with the wrong secret
            await post(f"Basic {paid}"),
            await post(f"Bearer {paid}x"),  # malformed
            await post(paid),
        ]
        stub.kill()
        statuses.append(await post(f"Bearer {paid}"))  # 502: the backend is gone
    assert statuses == [200, 200, 200, 429, 200, 400, 400, 401, 401, 401, 401, 502]

    gateway.stop()  # a stopping gateway writes the lines it holds (gateway/observe/logs.py)
    request_lines = [line for line in gateway.log.read_text().splitlines() if line.startswith("{")]
    assert len(request_lines) >= len(statuses), gateway.log.read_text()
    # The services fixture now reads every line of every log for the keys, the secret halves and SECRET.


async def test_the_admin_api_refuses_without_its_token_and_is_not_on_the_public_port(
    services: ServiceSet, quotas: Path, redis_url: str
) -> None:
    token, wrong = "admin-token-of-at-least-16-bytes", "admin-token-that-is-not-the-one"
    services.secrets += [token, wrong]
    admin_port = free_port()
    stub = services.stub_upstream()
    gateway = services.gateway(
        "gateway", quotas, redis_url, stub.url, {"QUOTAGATE_ADMIN_TOKEN": token}, "--admin-port", str(admin_port)
    )
    stub.wait_ready()
    gateway.wait_ready()
    key = await services.create_key(redis_url, "alice", "free")
    admin = f"http://127.0.0.1:{admin_port}"
    usage, grant = "/v1/accounts/alice/usage", "/v1/accounts/alice/grant"

    async with httpx.AsyncClient() as client:
        assert (await client.post(gateway.url + PATH, json=BODY, headers={"Authorization": f"Bearer {key}"})).is_success
        refused = [
            await client.get(admin + usage),
            await client.get(admin + usage, headers={"Authorization": f"Bearer {wrong}"}),
            await client.get(admin + usage, headers={"Authorization": token}),
            await client.post(admin + grant, json={"images": 5}, headers={"Authorization": f"Bearer {wrong}"}),
        ]
        public = [
            await client.get(gateway.url + usage, headers={"Authorization": f"Bearer {token}"}),
            await client.post(gateway.url + grant, json={"images": 5}, headers={"Authorization": f"Bearer {token}"}),
        ]
        allowed = await client.get(admin + usage, headers={"Authorization": f"Bearer {token}"})

    assert [answer.status_code for answer in refused] == [401, 401, 401, 401]
    assert all(answer.json()["error"]["message"] for answer in refused)
    assert [answer.status_code for answer in public] == [404, 404]
    assert allowed.status_code == 200
    daily = next(limit for limit in allowed.json()["limits"] if limit["kind"] == "daily")
    assert daily["remaining"] == 2  # the refused grant gave nothing
