"""`quotagate up` as an operator runs it: real redis-server, real tiny diffusers backend, the gateway.

The official `openai` client talks to it; the free key gets three images and then a RateLimitError.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import redis
from PIL import Image

from tests.ports import free_port
from tests.support.processes import BIN, ROOT, Service, ServiceSet

pytestmark = pytest.mark.slow

START_TIMEOUT = 300.0


@dataclass
class Stack:
    service: Service
    data_dir: Path
    admin_url: str

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.service.process

    @property
    def output(self) -> list[str]:
        """What `quotagate up` printed so far, line by line."""
        return self.service.logged().splitlines(keepends=True)

    def keys_from_banner(self) -> dict[str, str]:
        keys = {}
        for line in self.output:
            if " key: " in line:
                plan, key = line.split(" key: ")
                keys[plan.strip()] = key.strip()
        return keys


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("stack")
    admin_port = free_port()
    services = ServiceSet(tmp_path_factory.mktemp("stack-logs"))
    up = services.up(ROOT / "config/quotas.yaml", data_dir, admin_port)
    try:
        up.wait_logged("Ctrl-C stops everything", timeout=START_TIMEOUT)
        yield Stack(up, data_dir, f"http://127.0.0.1:{admin_port}")
    finally:
        # A test failed before Ctrl-C: stop the whole stack, not just its supervisor.
        up.stop(signal.SIGINT, timeout=60)


@contextlib.contextmanager
def _client(stack: Stack, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=60) as client:
        yield client


def test_banner_prints_a_free_and_a_pro_key_and_a_curl_line(stack: Stack) -> None:
    assert set(stack.keys_from_banner()) == {"free", "pro"}
    assert any(line.strip().startswith("curl -s") for line in stack.output)


def test_keys_create_finds_the_running_stack_by_its_data_dir(stack: Stack) -> None:
    created = subprocess.run(
        [BIN / "quotagate", "keys", "create", "cli-user", "--plan", "free", "--json", "--data-dir", stack.data_dir],
        capture_output=True,
        text=True,
        check=True,
    )
    record = json.loads(created.stdout)
    assert record["account"] == "cli-user" and record["plan"] == "free" and record["key"].startswith("qg_")
    with _client(stack, record["key"]) as client:
        image = client.images.generate(prompt="a red fox", n=1, response_format="b64_json")
    assert image.data and image.data[0].b64_json


def test_keys_create_refuses_a_plan_the_config_does_not_offer(stack: Stack) -> None:
    refused = subprocess.run(
        [BIN / "quotagate", "keys", "create", "x", "--plan", "platinum", "--data-dir", stack.data_dir],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1
    assert "plan 'platinum' is not in" in refused.stderr


def test_free_key_gets_three_images_then_rate_limit_error(stack: Stack) -> None:
    with _client(stack, stack.keys_from_banner()["free"]) as client:
        for i in range(3):
            result = client.images.generate(prompt=f"lighthouse {i}", n=1, response_format="b64_json")
            assert result.data is not None and result.data[0].b64_json is not None
            png = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
            assert png.format == "PNG" and png.width > 0
        with pytest.raises(openai.RateLimitError) as refused:
            client.images.generate(prompt="one more", n=1, response_format="b64_json")
    assert refused.value.status_code == 429
    assert refused.value.code == "insufficient_quota"
    headers = refused.value.response.headers
    assert int(headers["Retry-After"]) > 0
    # The rate-limit fields reach the client intact, and Retry-After is never before the daily reset.
    assert '"free-daily";q=3;w=86400' in headers["RateLimit-Policy"]
    reset = int(headers["RateLimit"].split('"free-daily";r=0;t=')[1].split(",")[0])
    assert int(headers["Retry-After"]) >= reset
    assert headers["x-ratelimit-limit-images"] == "3" and headers["x-ratelimit-remaining-images"] == "0"
    assert headers["x-ratelimit-reset-images"].endswith("s") and "x-ratelimit-remaining-requests" in headers


def test_pro_key_is_not_stopped_by_a_daily_quota(stack: Stack) -> None:
    with _client(stack, stack.keys_from_banner()["pro"]) as client:
        for _ in range(2):
            result = client.images.generate(prompt="a blue whale", n=2, response_format="b64_json")
            assert result.data is not None and len(result.data) == 2


def test_metrics_count_requests_by_plan_and_outcome(stack: Stack) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{stack.url}/metrics") as answer:
        text = answer.read().decode()
    assert 'outcome="quota_exhausted",plan="free"' in text


def test_the_admin_api_answers_with_the_token_from_the_data_dir(stack: Stack) -> None:
    import urllib.error
    import urllib.request

    token = (stack.data_dir / "admin-token").read_text().strip()
    asked = urllib.request.Request(f"{stack.admin_url}/v1/accounts/demo-free/usage")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(asked)
    assert refused.value.code == 401
    refused.value.close()
    asked.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(asked) as answer:
        usage = json.loads(answer.read())
    assert usage["account"] == "demo-free" and usage["plan"] == "free"
    assert any(line.startswith("Admin API: ") for line in stack.output)
    assert token not in "".join(stack.output)


def test_ctrl_c_stops_all_three_cleanly(stack: Stack) -> None:
    redis_url = json.loads((stack.data_dir / "stack.json").read_text())["redis_url"]
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(60) == 0
    assert not (stack.data_dir / "stack.json").exists()
    with pytest.raises((redis.ConnectionError, OSError)):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
    assert (stack.data_dir / "redis" / "appendonlydir").exists() or list((stack.data_dir / "redis").glob("*.aof"))
