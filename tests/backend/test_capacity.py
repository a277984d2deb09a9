"""The backend advertises its capacity: GET /v1/capacity, the Quotagate-Capacity header, the drain rate."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from backend.capacity import CAPACITY_HEADER, Capacity, DrainRate
from backend.scheduling import Job
from backend.withdrawals import JOB_HEADER
from tests.backend.conftest import (
    AppFactory,
    RecordingRunner,
    batcher_of,
    hold_worker,
    make_limits,
    make_settings,
    portal,
    request,
)

IMAGES = "/v1/images/generations"

# RFC 8941 section 3.2 keys, 3.3.1 integers and 3.3.2 decimals: the only item types the header may use.
_KEY = r"[a-z*][a-z0-9_\-.*]*"
_INTEGER = r"-?[0-9]{1,15}"
_DECIMAL = r"-?[0-9]{1,12}\.[0-9]{1,3}"
_MEMBER = re.compile(rf"({_KEY})=({_DECIMAL}|{_INTEGER})")
_SEPARATOR = re.compile(r"[ \t]*,[ \t]*")


def parse_sf_dictionary(value: str) -> dict[str, int | float]:
    """A strict RFC 8941 dictionary parser for members whose values are integers or decimals, no parameters."""
    members = _SEPARATOR.split(value.strip(" "))
    parsed: dict[str, int | float] = {}
    for member in members:
        match = _MEMBER.fullmatch(member)
        if match is None:
            raise ValueError(f"not an RFC 8941 dictionary member of numbers: {member!r} in {value!r}")
        key, item = match.groups()
        parsed[key] = float(item) if "." in item else int(item)
    return parsed


def _ewma(observations: list[tuple[int, float]], weight: float) -> float:
    rate: float | None = None
    for images, seconds in observations:
        sample = images / seconds
        rate = sample if rate is None else rate + weight * (sample - rate)
    return 0.0 if rate is None else rate


_batches = st.lists(
    st.tuples(st.integers(min_value=1, max_value=64), st.floats(min_value=1e-3, max_value=100.0)),
    min_size=1,
    max_size=30,
)


@given(_batches)
def test_the_drain_rate_is_the_weighted_mean_of_batch_rates_and_stays_within_them(
    observations: list[tuple[int, float]],
) -> None:
    drain = DrainRate(weight=0.3)
    assert drain.images_per_s == 0.0
    for images, seconds in observations:
        drain.observe(images, seconds)

    rates = [images / seconds for images, seconds in observations]
    assert math.isclose(drain.images_per_s, _ewma(observations, 0.3), rel_tol=1e-9)
    assert min(rates) * (1 - 1e-9) <= drain.images_per_s <= max(rates) * (1 + 1e-9)


def test_the_drain_rate_follows_a_halved_throughput() -> None:
    drain = DrainRate(weight=0.5)
    for _ in range(20):
        drain.observe(8, 1.0)
    assert drain.images_per_s == pytest.approx(8.0)
    for _ in range(20):
        drain.observe(8, 2.0)
    assert drain.images_per_s == pytest.approx(4.0, rel=1e-5)


@given(st.integers(max_value=0), st.floats(min_value=-10.0, max_value=0.0))
def test_batches_without_images_or_time_leave_the_drain_rate_alone(images: int, seconds: float) -> None:
    drain = DrainRate()
    drain.observe(images, 1.0)
    drain.observe(4, seconds)
    assert drain.images_per_s == 0.0
    assert drain.seconds_for(10) is None
    drain.observe(4, 2.0)
    drain.observe(images, 1.0)
    drain.observe(4, seconds)
    assert drain.images_per_s == 2.0
    assert drain.seconds_for(10) == 5.0


@given(
    slots=st.integers(min_value=1, max_value=10**6),
    queue=st.integers(min_value=1, max_value=10**6),
    queued=st.integers(min_value=0, max_value=10**6),
    running=st.integers(min_value=0, max_value=10**6),
    rate=st.floats(min_value=0.0, max_value=1e15, allow_nan=False),
)
def test_the_header_is_an_rfc8941_dictionary_of_the_reading(
    slots: int, queue: int, queued: int, running: int, rate: float
) -> None:
    reading = Capacity(
        slots=slots, queue_images=queue, queued_images=queued, running_images=running, images_per_s=rate, ready=True
    )

    parsed = parse_sf_dictionary(reading.header_value())

    assert parsed.keys() == {"slots", "queue", "queued", "running", "rate"}
    assert (parsed["slots"], parsed["queue"], parsed["queued"], parsed["running"]) == (slots, queue, queued, running)
    assert isinstance(parsed["rate"], float)
    assert parsed["rate"] == pytest.approx(min(rate, 999_999_999_999.999), abs=0.0005)


def _finish(client: TestClient, recording: RecordingRunner, jobs: list[Job]) -> None:
    recording.gate.set()

    async def wait() -> None:
        await asyncio.gather(*(job.future for job in jobs))

    portal(client).call(wait)


def test_the_capacity_endpoint_follows_a_queue_that_fills_and_drains(
    serve: AppFactory, recording: RecordingRunner
) -> None:
    registry = CollectorRegistry()
    client = serve(make_settings(max_batch_images=2, max_queue_images=8), registry=registry)

    idle = client.get("/v1/capacity")
    assert idle.status_code == 200
    assert idle.json() == {
        "slots": 2,
        "queue_images": 8,
        "queued_images": 0,
        "running_images": 0,
        "images_per_s": 0.0,
        "ready": True,
    }

    blocker = hold_worker(client, recording)
    seen = [client.get("/v1/capacity").json()]
    jobs = [blocker]
    for n in (2, 1, 3):
        jobs.append(portal(client).call(batcher_of(client).submit, request(f"queued {n}", n=n)))
        seen.append(client.get("/v1/capacity").json())

    assert [reading["queued_images"] for reading in seen] == [0, 2, 3, 6]
    assert all(reading["running_images"] == 1 for reading in seen)

    _finish(client, recording, jobs)
    drained = client.get("/v1/capacity").json()
    assert drained["queued_images"] == 0
    assert drained["running_images"] == 0
    assert drained["images_per_s"] > 0
    gauge = registry.get_sample_value("quotagate_backend_drain_images_per_second")
    assert gauge == drained["images_per_s"]


def _advertised(headers: Mapping[str, str]) -> dict[str, int | float]:
    value = headers.get(CAPACITY_HEADER)
    assert value is not None, f"an answer without a {CAPACITY_HEADER} header"
    return parse_sf_dictionary(value)


def test_every_answer_of_the_images_route_carries_the_capacity_header(
    serve: AppFactory, recording: RecordingRunner
) -> None:
    client = serve(make_settings(limits=make_limits(max_n=1), max_batch_images=1, max_queue_images=1))

    served = client.post(IMAGES, json={"prompt": "served"})
    assert served.status_code == 200
    after_served = _advertised(served.headers)
    assert after_served["slots"] == 1
    assert after_served["queue"] == 1
    assert after_served["queued"] == 0
    assert after_served["running"] == 0
    assert after_served["rate"] > 0

    invalid = client.post(IMAGES, json={"prompt": ""})
    assert invalid.status_code == 400
    assert _advertised(invalid.headers)["queued"] == 0

    assert client.delete("/v1/jobs/early").json() == {"withdrawn": True}
    withdrawn = client.post(IMAGES, json={"prompt": "withdrawn"}, headers={JOB_HEADER: "early"})
    assert withdrawn.status_code == 409
    assert _advertised(withdrawn.headers)["running"] == 0

    blocker = hold_worker(client, recording)
    queued = portal(client).call(batcher_of(client).submit, request("fills the queue"))
    refused = client.post(IMAGES, json={"prompt": "one too many"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "queue_full"
    assert {key: _advertised(refused.headers)[key] for key in ("queued", "running")} == {"queued": 1, "running": 1}
    _finish(client, recording, [blocker, queued])
