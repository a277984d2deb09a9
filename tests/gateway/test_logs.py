"""One structured line per request, read from a real gateway process's stderr: JSON to a pipe, text to a terminal."""

from __future__ import annotations

import json
import logging
import os
import pty
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config.quotas import Config
from gateway.observe.logs import JsonFormatter
from tests.support.keys import key_store
from tests.support.processes import gateway_processes
from tests.support.quotas import QUOTAS
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
PROMPT = "a lighthouse painted by a secretive otter"


@pytest.fixture
async def free_key(redis_client: Redis) -> str:
    return await key_store(redis_client).create_key("acct-free", "free")


def _send(url: str, key: str, n: int, request_id: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "X-Request-Id": request_id}
    return httpx.post(f"{url}{PATH}", json={"prompt": PROMPT, "n": n}, headers=headers)


@pytest.mark.slow
async def test_each_request_is_one_json_line_without_the_key_or_the_prompt(
    tmp_path: Path, redis_url: str, upstream: StubUpstream, free_key: str
) -> None:
    with gateway_processes(1, _quotas(tmp_path), redis_url, upstream.url, tmp_path) as (served,):
        assert _send(served.url, free_key, 2, "req-allowed").status_code == 200
        assert _send(served.url, free_key, 2, "req-refused").status_code == 429  # 1 of 3 images left
        assert _send(served.url, _wrong_secret(free_key), 1, "req-badkey").status_code == 401
        upstream.status = 500
        answer = _send(served.url, free_key, 1, "req-failed")
        assert answer.status_code == 500 and answer.headers["X-Request-Id"] == "req-failed"
    output = served.logged()
    assert free_key not in output and free_key.rsplit("_", 1)[1] not in output
    assert PROMPT not in output and "otter" not in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    requests = {line["request_id"]: line for line in lines if line["logger"] == "quotagate.request"}
    assert list(requests) == ["req-allowed", "req-refused", "req-badkey", "req-failed"]
    allowed = requests["req-allowed"]
    assert allowed["account"] == "acct-free" and allowed["plan"] == "free" and allowed["route"] == PATH
    assert (allowed["outcome"], allowed["cost"], allowed["status"], allowed["upstream_status"]) == (
        "allowed",
        2,
        200,
        200,
    )
    assert allowed["decision_ms"] > 0 and allowed["upstream_ms"] > 0 and allowed["total_ms"] >= allowed["upstream_ms"]
    refused = requests["req-refused"]
    assert (refused["outcome"], refused["status"], refused["upstream_status"]) == ("quota_exhausted", 429, None)
    assert refused["decision_ms"] > 0
    bad_key = requests["req-badkey"]
    assert (bad_key["outcome"], bad_key["account"], bad_key["status"]) == ("unauthorized", None, 401)
    failed = requests["req-failed"]
    assert (failed["outcome"], failed["upstream_status"], failed["cost"]) == ("upstream_error", 500, 1)
    assert all(line["level"] == "info" and line["ts"].endswith("Z") for line in requests.values())


@pytest.mark.slow
async def test_a_terminal_gets_plain_text(
    tmp_path: Path, redis_url: str, upstream: StubUpstream, free_key: str
) -> None:
    leader, follower = pty.openpty()
    try:
        with gateway_processes(1, _quotas(tmp_path), redis_url, upstream.url, tmp_path, terminal=follower) as (served,):
            assert _send(served.url, free_key, 1, "req-tty").status_code == 200
        os.close(follower)
        follower = -1
        output = _read_all(leader)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    line = next(line for line in output.splitlines() if "req-tty" in line)
    assert not line.lstrip().startswith("{")
    assert f"POST {PATH} 200 allowed" in line and "account=acct-free" in line and "plan=free" in line
    assert free_key not in output and PROMPT not in output


def _quotas(tmp_path: Path) -> Path:
    path = tmp_path / "quotas.yaml"
    path.write_text(QUOTAS)
    return path


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end of the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture
def request_lines() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("quotagate.request")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)


async def test_prompts_are_logged_only_when_the_operator_asks(
    redis_url: str, upstream: StubUpstream, config: Config, free_key: str, request_lines: list[logging.LogRecord]
) -> None:
    for log_prompts in (False, True):
        app = create_app(settings_for(redis_url, upstream.url, log_prompts=log_prompts), config)
        with TestClient(app) as client:
            client.post(PATH, json={"prompt": PROMPT}, headers={"Authorization": f"Bearer {free_key}"})
    without, with_prompt = (JsonFormatter().format(record) for record in request_lines)
    assert PROMPT not in without
    assert json.loads(with_prompt)["prompt"] == PROMPT


def _wrong_secret(key: str) -> str:
    """`key` with the last character of its secret changed."""
    return key[:-1] + ("1" if key.endswith("0") else "0")
