"""Fuzzing: generated requests from the OpenAPI description, random bytes as bodies, headers and quota files.

Against a real gateway process (real Redis, the stub image service in its own process): no input may
cause a 5xx or a crash, and an account is charged exactly the images that came back, whatever was refused.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from gateway.config.quotas import load_config
from gateway.errors import ConfigError
from tests.support.processes import Service, ServiceSet
from tests.support.quotas import IMAGES as PATH
from tests.support.quotas import RELIABILITY_QUOTAS as QUOTAS
from tests.support.readings import images_used

pytestmark = pytest.mark.slow

# Bounded: the whole file runs in seconds. No example database: every run starts fresh and the same.
FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture
def gateway(services: ServiceSet, quotas: Path, redis_url: str) -> Iterator[tuple[Service, str]]:
    """A gateway in front of the stub, and a key of the `paid` plan (so no quota refuses a request)."""
    stub = services.stub_upstream()
    # The failed-authentication guard off: past 20 unauthenticated examples a minute it would refuse
    # every later one with 429, good keys too, and the header fuzz would see no 200 at all.
    gateway = services.gateway("gateway", quotas, redis_url, stub.url, {"QUOTAGATE_AUTH_FAILURES_PER_MINUTE": "0"})
    stub.wait_ready()
    gateway.wait_ready()
    yield gateway, asyncio.run(services.create_key(redis_url, "fuzzer", "paid"))
    assert gateway.process.poll() is None, "the gateway crashed"


def test_openapi_cases_get_no_5xx_and_only_delivered_images_are_charged(
    gateway: tuple[Service, str], quotas: Path, redis_url: str
) -> None:
    service, key = gateway
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json")
    tally: Counter[str] = Counter()

    def fuzz(mode: GenerationMode) -> None:
        @FUZZ
        @given(case=schema.as_strategy(generation_mode=mode))
        def call(case: schemathesis.Case) -> None:
            answer = case.call(base_url=service.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert answer.status_code < 500, f"{case.method} {case.path} {case.body!r} → {answer.status_code}"
            tally[f"{mode.value} {answer.status_code}"] += 1
            if case.path == PATH and answer.status_code == 200:
                tally["images"] += len(answer.json()["data"])

        call()

    fuzz(GenerationMode.POSITIVE)
    fuzz(GenerationMode.NEGATIVE)

    assert tally["positive 200"] > 0 and sum(n for k, n in tally.items() if k.startswith("negative 4")) > 0, tally
    assert asyncio.run(images_used(redis_url, quotas, "fuzzer", "paid")) == tally["images"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "prompt": json_values | st.text(max_size=50),
        "n": json_values | st.integers(-3, 12),
        "size": json_values,
        "response_format": json_values,
        "seed": json_values,
    },
).map(lambda body: json.dumps(body).encode())


def test_random_bodies_get_no_5xx_and_only_delivered_images_are_charged(
    gateway: tuple[Service, str], quotas: Path, redis_url: str
) -> None:
    service, key = gateway
    tally: Counter[str] = Counter()
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:

        @FUZZ
        @given(body=st.binary(max_size=2048) | request_like)
        def post(body: bytes) -> None:
            answer = client.post(PATH, content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code in (200, 400), f"{body!r} → {answer.status_code} {answer.text}"
            assert answer.headers["content-type"] == "application/json"
            tally[str(answer.status_code)] += 1
            if answer.status_code == 200:
                tally["images"] += len(answer.json()["data"])

        post()

    assert tally["200"] > 0 and tally["400"] > 0, tally
    assert asyncio.run(images_used(redis_url, quotas, "fuzzer", "paid")) == tally["images"]


# Header names and values as raw bytes: anything but the CR and LF that end a header line. Half of
# them well-formed, so that each run has requests that pass too (all-random bytes made every one of
# 100 requests a 400 in about one run in ten).
header_bytes = st.binary(min_size=1, max_size=64).filter(lambda b: b"\r" not in b and b"\n" not in b)
header_names = st.from_regex(rb"\A[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}\Z") | header_bytes
header_values = st.from_regex(rb"\A[\x20-\x7e]{1,32}\Z") | header_bytes


def raw_request(url: str, head: bytes, body: bytes) -> int | None:
    """Send `head` + body over a plain socket; the status code, or None if the server closed without one."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = re.match(rb"HTTP/1\.[01] (\d{3}) ", reply)
    return int(status.group(1)) if status else None


def test_random_header_bytes_get_no_5xx_and_the_gateway_stays_up(gateway: tuple[Service, str]) -> None:
    service, key = gateway
    body = b'{"prompt": "a lighthouse", "n": 1}'
    tally: Counter[int | None] = Counter()

    @FUZZ
    @given(name=header_names, value=header_values, authorized=st.booleans())
    def send(name: bytes, value: bytes, authorized: bool) -> None:
        head = b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        if authorized:
            head += b"Authorization: Bearer " + key.encode() + b"\r\n"
        status = raw_request(service.url, head + name + b": " + value + b"\r\n", body)
        assert status is None or status < 500, f"{name!r}: {value!r} → {status}"
        tally[status] += 1

    send()
    assert httpx.get(service.url + "/healthz").status_code == 200
    assert tally[200] > 0 and (tally[400] + tally[401] + tally[None]) > 0, tally


yaml_mutations = st.builds(
    lambda cut, junk, dropped: (QUOTAS[:cut] + junk + QUOTAS[cut + dropped :]).encode(),
    st.integers(0, len(QUOTAS)),
    st.text(max_size=20),
    st.integers(0, 30),
)


@settings(max_examples=1000, deadline=None, database=None)
@given(data=st.binary(max_size=400) | yaml_mutations)
def test_random_quota_files_load_or_are_refused_naming_the_file(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzzed-quotas.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as refused:
        assert re.match(re.escape(str(path)) + r"(:\d+)?: \S", str(refused)), str(refused)


def test_backend_openapi_cases_get_no_5xx_and_the_backend_stays_up(services: ServiceSet, tmp_path: Path) -> None:
    # Small and quick to serve: 64 px, at most 2 images of 2 steps.
    limits = ("--sizes", "64x64", "--default-size", "64x64", "--max-n", "2", "--max-steps", "2")
    backend = services.backend(Path("tiny"), "--data-dir", str(tmp_path / "backend"), *limits)
    backend.wait_ready("/readyz", timeout=120)
    schema = schemathesis.openapi.from_url(backend.url + "/openapi.json")
    tally: Counter[str] = Counter()

    def fuzz(mode: GenerationMode) -> None:
        @settings(FUZZ, max_examples=25)
        @given(case=schema.as_strategy(generation_mode=mode))
        def call(case: schemathesis.Case) -> None:
            answer = case.call(base_url=backend.url, timeout=60)
            assert answer.status_code < 500, f"{case.method} {case.path} {case.body!r} → {answer.status_code}"
            tally[f"{mode.value} {answer.status_code}"] += 1

        call()

    fuzz(GenerationMode.POSITIVE)
    fuzz(GenerationMode.NEGATIVE)
    assert backend.process.poll() is None, "the backend crashed"
    assert tally["positive 200"] > 0 and tally["negative 400"] > 0, tally
