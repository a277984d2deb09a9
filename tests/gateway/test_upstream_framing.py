"""Through a running gateway: whatever an upstream sends past one answer reaches no client, this one or the next.

The upstream is a raw socket server that writes each answer's bytes exactly as scripted; the gateway forwards
two users' requests in turn, over its pool of kept connections.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.config.quotas import Config
from tests.support.keys import key_store
from tests.support.settings import settings_for
from tests.support.upstream import serve_in_thread

from .scripted_upstream import scripted

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
HANG = 10.0  # seconds; a bound on a hang, not a timing assertion


def _answer(body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head + body


FIRST_BODY = b'{"created": 1, "data": [{"b64_json": "Zmlyc3Q="}]}'
SECOND_BODY = b'{"created": 2, "data": [{"b64_json": "c2Vjb25k"}]}'
# Past the first answer's end, in the same segment: a whole answer of its own, or the start of one that,
# left in a parser, the next answer on that connection would complete (its status line read as a header value).
TRAILING = {
    "a second answer": b"HTTP/1.1 404 Not Found\r\nSet-Cookie: session=user-one\r\nContent-Length: 4\r\n\r\nevil",
    "an unfinished answer": b"HTTP/1.1 201 Created\r\nSet-Cookie: session=user-one; x=",
}


@pytest.mark.parametrize("trailing", TRAILING.values(), ids=TRAILING.keys())
async def test_bytes_past_an_upstream_answer_reach_neither_its_client_nor_the_next_one(
    redis_url: str, redis_client: Redis, config: Config, trailing: bytes
) -> None:
    keys = key_store(redis_client)
    first_user, second_user = await keys.create_key("ann", "free"), await keys.create_key("bob", "free")
    async with scripted(_answer(FIRST_BODY) + trailing, _answer(SECOND_BODY)) as upstream:
        app = create_app(settings_for(redis_url, upstream.url), config, registry=CollectorRegistry())
        with serve_in_thread(app, lifespan="on") as url:  # type: ignore[arg-type]
            answers = []
            for key in (first_user, second_user):  # one after the other: the second may reuse the first's connection
                async with httpx.AsyncClient(base_url=url, timeout=HANG) as user:
                    headers = {"Authorization": f"Bearer {key}"}
                    answers.append(await user.post(PATH, json={"prompt": "x"}, headers=headers))
    first, second = answers
    assert (first.status_code, first.content) == (200, FIRST_BODY)
    assert (second.status_code, second.content) == (200, SECOND_BODY)
    assert "set-cookie" not in first.headers and "set-cookie" not in second.headers
    assert upstream.connections == 2  # the first connection was closed, not pooled


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
FAULTY = {
    "101": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello",
        "the upstream answered 101 Switching Protocols, which is never relayed",
    ),
    "interim flood": (EARLY_HINTS * 9 + _answer(FIRST_BODY), "the upstream sent more than 8 interim 1xx answers"),
    "huge head": (
        b"HTTP/1.1 200 OK\r\nX-Huge: %s\r\n" % (b"h" * (1 << 17)) + _answer(FIRST_BODY).split(b"\r\n", 1)[1],
        "the answer's head is larger than 64 KiB",
    ),
}


@pytest.mark.parametrize(("answer", "reason"), FAULTY.values(), ids=FAULTY.keys())
async def test_a_switch_of_protocol_an_interim_flood_or_a_huge_head_is_a_clean_502_refunded(
    redis_url: str, redis_client: Redis, config: Config, answer: bytes, reason: str
) -> None:
    key = await key_store(redis_client).create_key("ann", "free")
    registry = CollectorRegistry()
    async with scripted(answer) as upstream:
        app = create_app(settings_for(redis_url, upstream.url), config, registry=registry)
        with serve_in_thread(app, lifespan="on") as url:  # type: ignore[arg-type]
            async with httpx.AsyncClient(base_url=url, timeout=HANG) as user:
                refused = await user.post(PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 502 and refused.json()["error"]["code"] == "upstream_error"
    # Nothing of the upstream's answer is relayed, and the message says why without naming the upstream.
    message = refused.json()["error"]["message"]
    assert reason in message and upstream.url.split("//")[1] not in message and "127.0.0.1" not in message
    assert _refunded(registry) == 1


def _refunded(registry: CollectorRegistry) -> float:
    """The free plan's images refunded, whatever the reason."""
    samples = (sample for metric in registry.collect() for sample in metric.samples)
    return sum(s.value for s in samples if s.name == "quotagate_images_refunded_total" and s.labels["plan"] == "free")
