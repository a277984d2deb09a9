"""What a client sends reaches only where it belongs: not the upstream when it named it hop-by-hop, not a
log line as a control character, not a public health answer as an internal address; and every path reads
repeated headers the same way. Against real gateway processes, written byte for byte on plain sockets.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ops.embedded_redis import RedisServer
from tests.adversarial.gateways import served
from tests.ports import free_port
from tests.support.keys import new_key
from tests.support.processes import gateway_processes
from tests.support.quotas import IMAGES, quota_file

from .wire import exchange, request_bytes

pytestmark = pytest.mark.slow

EXAMPLES = settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
BODY = json.dumps({"prompt": "a lighthouse", "n": 1}).encode()

field_names = st.from_regex(r"\Ax-[a-z]{1,12}\Z").filter(lambda name: not name.startswith("x-quotagate-"))


def test_fields_the_client_names_in_connection_never_reach_the_upstream(redis_url: str, tmp_path: Path) -> None:
    with served(redis_url, tmp_path) as (gateway, stub):
        key = new_key(redis_url, "ann", "pro")

        @EXAMPLES
        @given(named=st.lists(field_names, min_size=1, max_size=3, unique=True), kept=field_names, upper=st.booleans())
        def hop_by_hop(named: list[str], kept: str, upper: bool) -> None:
            listed = ", ".join(name.upper() if upper else name for name in named)
            fields = [("Authorization", f"Bearer {key}"), ("Connection", f"close, {listed}")]
            fields += [(name, "for the gateway only") for name in named] + [(kept, "end to end")]
            stub.seen.clear()
            assert exchange(gateway.url, request_bytes("POST", IMAGES, fields, BODY)).status == 200
            (seen,) = stub.seen
            assert not set(named) & set(seen), f"Connection: {listed} and the upstream saw {sorted(seen)}"
            if kept not in named:
                assert seen[kept] == "end to end"

        hop_by_hop()


def test_readyz_names_no_internal_address_when_redis_is_down(tmp_path: Path) -> None:
    port = free_port()
    redis = RedisServer(tmp_path / "redis", port=port)
    redis.start()
    quotas = quota_file(tmp_path)
    try:
        with gateway_processes(1, quotas, redis.url, "http://127.0.0.1:9", tmp_path) as (gateway,):
            redis.stop()
            answers = [httpx.get(f"{gateway.url}/readyz", timeout=10) for _ in range(3)]
    finally:
        redis.stop()
    assert [answer.status_code for answer in answers] == [503, 503, 503]
    for answer in answers:
        assert "127.0.0.1" not in answer.text and str(port) not in answer.text, answer.text
        assert answer.json()["status"] == "unavailable"


# Text a client controls, with the characters that end or rewrite a line (and a forged line after them).
hostile_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"])
    | st.sampled_from(["\n", "\r", "\x1b", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\x00", "\x7f"]),
    max_size=20,
).map(lambda text: text + "\n2099-01-01T00:00:00.000Z INFO    forged")
# A path with a line feed matches no route (Starlette's `{path:path}` is `.*`) and is answered unlogged;
# a carriage return, or any other line break, does match.
as_path = {ord("\n"): "\r"}
_LINE_BREAKING = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def test_the_text_log_escapes_what_clients_put_in_paths_and_prompts(redis_url: str, tmp_path: Path) -> None:
    env = {"QUOTAGATE_LOG_FORMAT": "text", "QUOTAGATE_LOG_PROMPTS": "1", "QUOTAGATE_AUTH_FAILURES_PER_MINUTE": "0"}
    markers: list[str] = []
    with served(redis_url, tmp_path, env) as (gateway, _):
        key = new_key(redis_url, "ann", "pro")

        @EXAMPLES
        @given(text=hostile_text, in_prompt=st.booleans())
        def hostile(text: str, in_prompt: bool) -> None:
            marker = f"marker{len(markers)}x"
            markers.append(marker)
            if in_prompt:
                body = json.dumps({"prompt": marker + text, "n": 1}).encode()
                fields = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json")]
                assert exchange(gateway.url, request_bytes("POST", IMAGES, fields, body)).status == 200
            else:
                target = "/v1/" + quote((marker + text).translate(as_path), safe="")
                assert exchange(gateway.url, request_bytes("GET", target, [])).status == 404

        hostile()
    log = gateway.log.read_text(encoding="utf-8", errors="replace")
    for marker in markers:
        # One line per request, whatever it carried: split as a terminal or a log reader might split.
        lines = [line for line in log.splitlines() if marker in line]
        assert len(lines) == 1, f"{marker}: {lines}"
        (line,) = lines
        assert not _LINE_BREAKING.search(line), repr(line)
        assert not any(unicodedata.category(char) == "Cc" and char != "\t" for char in line), repr(line)
    assert not re.search(r"^2099-", log, re.MULTILINE)


def test_v1_quota_reads_repeated_headers_as_the_image_route_does(redis_url: str, tmp_path: Path) -> None:
    with served(redis_url, tmp_path, {"QUOTAGATE_AUTH_FAILURES_PER_MINUTE": "0"}) as (gateway, _):
        key = new_key(redis_url, "ann", "pro")
        credentials = [f"Bearer {key}", "Bearer qg_0123456789abcdef_" + "1" * 48, "Bearer", f"Basic {key}"]

        @EXAMPLES
        @given(sent=st.lists(st.sampled_from(range(len(credentials))), min_size=1, max_size=3))
        def repeated(sent: list[int]) -> None:
            fields = [("Authorization", credentials[which]) for which in sent]
            quota = exchange(gateway.url, request_bytes("GET", "/v1/quota", fields)).status
            images = exchange(gateway.url, request_bytes("POST", IMAGES, fields, BODY)).status
            assert (quota == 200) == (images == 200), f"{sent}: /v1/quota {quota}, {IMAGES} {images}"
            assert quota in (200, 401) and images in (200, 401)

        repeated()
