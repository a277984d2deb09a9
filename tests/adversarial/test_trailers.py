"""Identity comes only from the header section: fields sent in a chunked body's trailer are never believed.

uvicorn's httptools protocol lists trailer fields among `scope["headers"]` when a request arrives in
one read, so each request here is written whole in one write on a plain socket, the way an attacker
would (an HTTP client library sends no trailers at all). Against a real gateway process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial.gateways import served
from tests.support.keys import new_key
from tests.support.processes import Service
from tests.support.quotas import IMAGES
from tests.support.upstream import StubUpstream

from .wire import exchange, request_bytes

pytestmark = pytest.mark.slow

EXAMPLES = settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
BODY = json.dumps({"prompt": "a lighthouse", "n": 1}).encode()


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[tuple[Service, StubUpstream, str]]:
    """A gateway that trusts this host as an auth proxy (so its account header would count), and a `pro` key.

    The failed-authentication guard is off, so that every answer shows what the trailer alone did.
    """
    env = {"QUOTAGATE_TRUSTED_PROXIES": "127.0.0.1", "QUOTAGATE_AUTH_FAILURES_PER_MINUTE": "0"}
    with served(redis_url, tmp_path, env) as (gateway, stub):
        yield gateway, stub, new_key(redis_url, "ann", "pro")


def chunked(
    method: str, path: str, head: list[tuple[str, str]], pieces: list[bytes], trailer: list[tuple[str, str]]
) -> bytes:
    """A request whose body is `pieces` as chunks, then `trailer` in its trailer section."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", "Connection: close", "Transfer-Encoding: chunked"]
    lines += [f"{name}: {value}" for name, value in head]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece)
    fields = "".join(f"{name}: {value}\r\n" for name, value in trailer).encode("latin-1")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + chunks + b"0\r\n" + fields + b"\r\n"


def cut(body: bytes, at: list[int]) -> list[bytes]:
    """`body` cut at the offsets `at`."""
    offsets = sorted({0, len(body), *(a % (len(body) + 1) for a in at)})
    return [body[start:end] for start, end in zip(offsets, offsets[1:], strict=False)]


def test_identity_sent_only_in_a_trailer_is_never_believed(
    gateway: tuple[Service, StubUpstream, str],
) -> None:
    process, stub, key = gateway
    identities = {"authorization": ("Authorization", f"Bearer {key}"), "account": ("X-Quotagate-Account", "ann")}
    # The same key and account in the header section are let in: what a trailer carries below is good.
    for name, value in identities.values():
        assert exchange(process.url, request_bytes("POST", IMAGES, [(name, value)], BODY)).status == 200
        assert exchange(process.url, request_bytes("GET", "/v1/quota", [(name, value)])).status == 200
    stub.seen.clear()

    @EXAMPLES
    @given(
        route=st.sampled_from([("POST", IMAGES), ("GET", "/v1/quota")]),
        in_trailer=st.lists(st.sampled_from(sorted(identities)), min_size=1, max_size=2, unique=True),
        in_head=st.sampled_from([[], [("Authorization", "Bearer junk")], [("X-Quotagate-Account", "nobody")]]),
        cuts=st.lists(st.integers(0, len(BODY)), max_size=3),
    )
    def trailer_attack(
        route: tuple[str, str], in_trailer: list[str], in_head: list[tuple[str, str]], cuts: list[int]
    ) -> None:
        method, path = route
        pieces = cut(BODY, cuts) if method == "POST" else []
        request = chunked(method, path, in_head, pieces, [identities[name] for name in in_trailer])
        answer = exchange(process.url, request)
        assert answer.status == 411, f"{in_trailer} in the trailer, {in_head} in the head: {answer.status}"
        assert answer.json()["error"]["code"] == "length_required"

    trailer_attack()
    assert stub.seen == [], "a request with identity in its trailer reached the image service"
