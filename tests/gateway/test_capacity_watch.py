"""The gateway learns each backend's capacity: polled from `GET /v1/capacity`, or learned from latency on a 404.

The sink here records what the watcher reports; it stands where the fleet's shared view (in Redis) stands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.config.quotas import PoolPolicy
from gateway.upstream.adaptive import DrainMeter, LearnedCapacity
from gateway.upstream.capacity import MAX_ANSWER_BYTES, MAX_IMAGES, CapacityWatcher, Reading, parse_reading
from gateway.upstream.client import UpstreamClient
from gateway.upstream.forward import Forwarder
from tests.support.processes import ServiceSet
from tests.support.upstream import StubUpstream, serve_in_thread

pytestmark = pytest.mark.anyio

POOL = "diffusion"
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port
HANG = 10.0  # seconds; a bound on a hang, not a timing assertion
READING = {
    "slots": 2,
    "queue_images": 6,
    "queued_images": 1,
    "running_images": 2,
    "images_per_s": 3.5,
    "ready": True,
}


class RecordingSink:
    """What the fleet would hold: each backend's last advertisement, and every call in order."""

    def __init__(self) -> None:
        self.fleet: dict[tuple[str, str], tuple[int, float, float]] = {}
        self.calls: list[tuple[Any, ...]] = []

    async def advertise(self, pool: str, backend: str, images: int, images_per_s: float, ttl: float) -> None:
        self.calls.append(("advertise", pool, backend, images, images_per_s, ttl))
        self.fleet[pool, backend] = (images, images_per_s, ttl)

    async def forget(self, pool: str, backend: str) -> None:
        self.calls.append(("forget", pool, backend))
        self.fleet.pop((pool, backend), None)


@dataclass
class CapacityStub:
    """A backend's `/v1/capacity` as a test scripts it: any status and body, or no answer until `released`."""

    status: int = 200
    body: bytes = json.dumps(READING).encode()
    held: bool = False
    asked: int = 0
    released: threading.Event = field(default_factory=threading.Event)

    def answer(self, reading: dict[str, Any] | None = None, *, status: int = 200, body: bytes | None = None) -> None:
        self.status, self.held = status, False
        self.body = body if body is not None else json.dumps(reading if reading is not None else READING).encode()

    def app(self) -> Starlette:
        async def capacity(request: Request) -> Response:
            self.asked += 1
            if self.held:  # the stub holds its answer; the test never waits on it
                for _ in range(int(HANG / 0.01)):
                    if self.released.is_set():
                        break
                    await asyncio.sleep(0.01)
            return Response(self.body, status_code=self.status, media_type="application/json")

        return Starlette(routes=[Route("/v1/capacity", capacity, methods=["GET"])])


@contextmanager
def capacity_stub() -> Iterator[tuple[CapacityStub, str]]:
    stub = CapacityStub()
    try:
        with serve_in_thread(stub.app()) as url:
            yield stub, url
    finally:
        stub.released.set()


@asynccontextmanager
async def watching(urls: tuple[str, ...], **options: Any) -> AsyncIterator[tuple[CapacityWatcher, RecordingSink]]:
    client = UpstreamClient(connect_timeout=HANG, read_timeout=HANG)
    sink = RecordingSink()
    try:
        yield CapacityWatcher(client, {POOL: urls}, sink, **options), sink
    finally:
        await client.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def capacity_log() -> Iterator[list[logging.LogRecord]]:
    """The watcher's log records (a handler of its own: another test may have configured the gateway's logging)."""
    records: list[logging.LogRecord] = []

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger, handler = logging.getLogger("quotagate.capacity"), Recording(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


# What a real backend does.


@pytest.mark.slow
async def test_a_real_backend_advertises_its_places_and_drain_rate_and_leaves_the_fleet_once_killed(
    tmp_path: Path,
) -> None:
    services = ServiceSet(tmp_path)
    try:
        backend = services.backend(
            Path("tiny"), "--data-dir", str(tmp_path / "backend"), "--max-batch-images", "2", "--max-queue", "6"
        )
        backend.wait_ready("/readyz", timeout=120)
        async with watching((backend.url,)) as (watcher, sink), httpx.AsyncClient(timeout=60) as http:
            await watcher.poll_once(0.0)
            assert sink.fleet == {(POOL, backend.url): (2 + 6, 0.0, 3.0)}

            made = await http.post(f"{backend.url}/v1/images/generations", json={"prompt": "a lighthouse", "n": 2})
            assert made.status_code == 200
            await watcher.poll_once(1.0)
            rate = (await http.get(f"{backend.url}/v1/capacity")).json()["images_per_s"]
            assert rate > 0
            assert sink.fleet == {(POOL, backend.url): (8, rate, 3.0)}

            backend.kill()
            await watcher.poll_once(2.0)
            assert sink.fleet == {}
            assert sink.calls[-1] == ("forget", POOL, backend.url)
    finally:
        services.stop()


# Readings, and answers that are not one.

_valid_readings = st.fixed_dictionaries(
    {
        "slots": st.integers(min_value=0, max_value=MAX_IMAGES),
        "queue_images": st.integers(min_value=0, max_value=MAX_IMAGES),
        "queued_images": st.integers(min_value=0, max_value=MAX_IMAGES),
        "running_images": st.integers(min_value=0, max_value=MAX_IMAGES),
        "images_per_s": st.one_of(
            st.integers(min_value=0, max_value=10**6), st.floats(min_value=0, max_value=1e12, allow_nan=False)
        ),
        "ready": st.booleans(),
    }
)
_not_counts = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=MAX_IMAGES + 1),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
_not_rates = st.one_of(
    st.floats(max_value=-1e-9, allow_infinity=False, allow_nan=False),
    st.integers(max_value=-1),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@given(_valid_readings)
def test_a_valid_reading_is_read_as_sent_and_a_loading_backend_takes_nothing(reading: dict[str, Any]) -> None:
    parsed = parse_reading(json.dumps({**reading, "a_field_of_a_newer_backend": [1]}).encode())
    assert parsed == Reading(**{**reading, "images_per_s": float(reading["images_per_s"])})
    assert parsed.images == (reading["slots"] + reading["queue_images"] if reading["ready"] else 0)


@given(_valid_readings, st.data())
def test_a_reading_with_any_field_missing_or_of_the_wrong_kind_is_refused_naming_it(
    reading: dict[str, Any], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(reading)))
    if name == "ready":
        wrong = data.draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))
    elif name == "images_per_s":
        wrong = data.draw(_not_rates)
    else:
        wrong = data.draw(_not_counts)
    broken = {**reading, name: wrong}
    with pytest.raises(ValueError, match=name):
        parse_reading(json.dumps(broken).encode())
    del broken[name]
    with pytest.raises(ValueError, match=f"{name}: missing"):
        parse_reading(json.dumps(broken).encode())


_MISBEHAVIOURS = {
    "not JSON": {"body": b'{"slots": 2,'},
    "not UTF-8": {"body": b"\xff\xfe"},
    "negative slots": {"reading": {**READING, "slots": -1}},
    "slots as a bool": {"reading": {**READING, "slots": True}},
    "slots as a float": {"reading": {**READING, "slots": 2.0}},
    "the rate as a string": {"reading": {**READING, "images_per_s": "3.5"}},
    "a rate of NaN": {"body": json.dumps(READING).replace("3.5", "NaN").encode()},
    "a rate of Infinity": {"body": json.dumps(READING).replace("3.5", "Infinity").encode()},
    "ready as a number": {"reading": {**READING, "ready": 1}},
    "a field missing": {"reading": {k: v for k, v in READING.items() if k != "queue_images"}},
    "a field twice": {"body": json.dumps(READING).replace('"slots": 2', '"slots": 2, "slots": 999').encode()},
    "a list": {"body": b"[]"},
    "an answer larger than the bound": {"reading": {**READING, "padding": "x" * MAX_ANSWER_BYTES}},
    "500": {"status": 500},
    "502 from a proxy": {"status": 502, "body": b"<html>bad gateway</html>"},
    "503": {"status": 503},
    "401": {"status": 401},
    "no answer": {"hold": True},
}


@pytest.mark.parametrize("misbehaviour", _MISBEHAVIOURS.values(), ids=_MISBEHAVIOURS.keys())
async def test_a_backend_that_answers_wrongly_is_forgotten_at_once_and_comes_back_when_it_answers_well(
    misbehaviour: dict[str, Any],
) -> None:
    with capacity_stub() as (stub, url):
        async with watching((url,), every=1.0) as (watcher, sink):
            await watcher.poll_once(0.0)
            assert sink.fleet == {(POOL, url): (8, 3.5, 3.0)}

            if misbehaviour.get("hold"):
                stub.held = True
            else:
                options = {k: v for k, v in misbehaviour.items() if k in ("status", "body")}
                stub.answer(misbehaviour.get("reading"), **options)
            await watcher.poll_once(1.0)
            assert sink.fleet == {}
            assert sink.calls[-1] == ("forget", POOL, url)

            stub.released.set()
            stub.answer({**READING, "images_per_s": 1.75})
            await watcher.poll_once(2.0)
            assert sink.fleet == {(POOL, url): (8, 1.75, 3.0)}


async def test_each_poll_advertises_the_latest_reading_and_a_loading_backend_advertises_nothing_to_take() -> None:
    with capacity_stub() as (stub, url):
        async with watching((url,), every=0.5) as (watcher, sink):
            for number, reading in enumerate(
                [
                    {**READING, "ready": False},  # loading its model
                    READING,
                    {**READING, "images_per_s": READING["images_per_s"] / 2},  # throughput halved
                    {**READING, "slots": 4, "queue_images": 12},  # restarted with more places
                ]
            ):
                stub.answer(reading)
                await watcher.poll_once(float(number))
                expected = reading["slots"] + reading["queue_images"] if reading["ready"] else 0
                assert sink.fleet == {(POOL, url): (expected, reading["images_per_s"], 1.5)}


async def test_a_refused_connection_forgets_the_backend_and_a_second_backend_is_unaffected() -> None:
    with capacity_stub() as (_, url):
        async with watching((DEAD, url)) as (watcher, sink):
            await watcher.poll_once(0.0)
    assert ("forget", POOL, DEAD) in sink.calls
    assert sink.fleet == {(POOL, url): (8, 3.5, 3.0)}


async def test_one_request_per_backend_per_round_even_for_a_backend_in_two_pools() -> None:
    with capacity_stub() as (stub, url):
        client = UpstreamClient(connect_timeout=HANG, read_timeout=HANG)
        sink = RecordingSink()
        try:
            watcher = CapacityWatcher(client, {POOL: (url,), "other": (url,)}, sink)
            for now in range(3):
                await watcher.poll_once(float(now))
        finally:
            await client.close()
    assert stub.asked == 3
    assert sink.fleet == {(POOL, url): (8, 3.5, 3.0), ("other", url): (8, 3.5, 3.0)}


async def test_a_state_is_logged_when_it_changes_not_at_every_poll(capacity_log: list[logging.LogRecord]) -> None:
    with capacity_stub() as (stub, url):
        async with watching((url,)) as (watcher, _):
            script = [READING] * 3 + [{**READING, "slots": -1}] * 3 + [b"{"] * 2 + [READING] * 2
            for now, answer in enumerate(script):
                if isinstance(answer, bytes):
                    stub.answer(body=answer)
                else:
                    stub.answer(answer)
                await watcher.poll_once(float(now))
    lines = [(record.levelno, record.getMessage()) for record in capacity_log]
    assert lines == [
        (logging.INFO, f"capacity: {url} (pool {POOL}) advertises its capacity"),
        (
            logging.WARNING,
            f"capacity: {url} (pool {POOL}) is left out of the fleet: an invalid capacity reading: "
            f"slots: expected a whole number from 0 to {MAX_IMAGES}, got -1",
        ),
        (logging.INFO, f"capacity: {url} (pool {POOL}) advertises its capacity"),
    ]


# A backend that advertises nothing.


async def test_a_backend_without_the_endpoint_advertises_its_learned_limit_and_drain_rate(
    upstream: StubUpstream,
) -> None:
    clock = Clock()
    # Weight 1: the rate advertised is that of the last interval alone, so each round's can be checked.
    learn = lambda: LearnedCapacity(drain=DrainMeter(weight=1.0))  # noqa: E731
    async with watching((upstream.url,), clock=clock, learn=learn) as (watcher, sink):
        await watcher.poll_once(clock.now)
        assert sink.fleet == {(POOL, upstream.url): (4, 0.0, 3.0)}  # the initial limit; nothing measured yet

        async def round_at_the_limit(rtt: float) -> int:
            """As many one-image requests as the advertised limit, together, each taking `rtt`; the limit used."""
            limit = sink.fleet[POOL, upstream.url][0]
            for _ in range(limit):
                watcher.started(POOL, upstream.url, 1)
            clock.now += rtt
            for _ in range(limit):
                watcher.finished(POOL, upstream.url, rtt, 1, True)
            await watcher.poll_once(clock.now)
            return limit

        # Kept at its limit with a steady latency: the limit probes upward, and the rate is what was made.
        for _ in range(20):
            limit = await round_at_the_limit(2.0)
            assert sink.fleet[POOL, upstream.url][1] == pytest.approx(limit / 2.0)  # `limit` images in 2 s
        grown = sink.fleet[POOL, upstream.url][0]
        assert grown > 4

        # Then the latency trebles at that load: the limit falls.
        for _ in range(3):
            await round_at_the_limit(6.0)
        assert sink.fleet[POOL, upstream.url][0] < grown

        # A failed request's latency says nothing of the limit, and it made no image.
        before = sink.fleet[POOL, upstream.url]
        watcher.started(POOL, upstream.url, 1)
        clock.now += 60.0
        watcher.finished(POOL, upstream.url, 60.0, 1, False)
        await watcher.poll_once(clock.now)
        assert sink.fleet[POOL, upstream.url] == before


async def test_a_request_path_naming_an_unknown_backend_is_told_so() -> None:
    async with watching((DEAD,)) as (watcher, _):
        with pytest.raises(KeyError, match="'http://elsewhere' is not a backend of pool 'diffusion'"):
            watcher.finished(POOL, "http://elsewhere", 1.0, 1, True)


async def test_a_backend_set_aside_by_passive_health_is_forgotten_unless_all_of_its_pool_are() -> None:
    now = [0.0]
    policy = PoolPolicy(eject_after=1, eject_for=10)
    with serve_in_thread(StubUpstream(status=500).app()) as broken, serve_in_thread(StubUpstream().app()) as working:
        client = UpstreamClient(connect_timeout=HANG, read_timeout=HANG)
        try:
            pools = {POOL: (broken, working)}
            forwarder = Forwarder(client, pools, clock=lambda: now[0])
            sink = RecordingSink()
            watcher = CapacityWatcher(client, pools, sink, set_aside=forwarder.is_set_aside)
            await watcher.poll_once(0.0)
            assert set(sink.fleet) == {(POOL, broken), (POOL, working)}  # both answer 404: both learned

            answer = await forwarder.open(POOL, policy, "POST", "/v1/images/generations", [], b"{}")
            answer.finish()  # a 500, and eject_after is 1
            assert answer.upstream.url == broken and forwarder.is_set_aside(POOL, broken)
            await watcher.poll_once(1.0)
            assert set(sink.fleet) == {(POOL, working)}
            assert sink.calls[-2:] in (
                [("forget", POOL, broken), ("advertise", POOL, working, 4, 0.0, 3.0)],
                [("advertise", POOL, working, 4, 0.0, 3.0), ("forget", POOL, broken)],
            )

            now[0] += 10  # eject_for has passed: back in the pool, and in the fleet
            await watcher.poll_once(2.0)
            assert set(sink.fleet) == {(POOL, broken), (POOL, working)}

            # Every one set aside: the forwarder then tries them all again, so all of them count.
            everything_aside = CapacityWatcher(client, pools, sink, set_aside=lambda pool, url: True)
            await everything_aside.poll_once(3.0)
            assert set(sink.fleet) == {(POOL, broken), (POOL, working)}
            with pytest.raises(KeyError, match="not an upstream of pool"):
                forwarder.is_set_aside(POOL, DEAD)
        finally:
            await client.close()


# The loop, and a sink that fails.


async def test_run_polls_until_stopped() -> None:
    stop = asyncio.Event()

    class StoppingSink(RecordingSink):
        async def advertise(self, pool: str, backend: str, images: int, images_per_s: float, ttl: float) -> None:
            await super().advertise(pool, backend, images, images_per_s, ttl)
            if len(self.calls) == 2:
                stop.set()

    with capacity_stub() as (stub, url):
        client = UpstreamClient(connect_timeout=HANG, read_timeout=HANG)
        sink = StoppingSink()
        try:
            # A short interval, so that the second round comes at once; the stop ends the loop after it.
            watcher = CapacityWatcher(client, {POOL: (url,)}, sink, every=0.001, timeout=HANG)
            await asyncio.wait_for(watcher.run(stop), HANG)
        finally:
            await client.close()
    assert stub.asked == 2
    assert [call[0] for call in sink.calls] == ["advertise", "advertise"]


async def test_run_goes_on_after_a_round_that_failed(capacity_log: list[logging.LogRecord]) -> None:
    stop, asked_aside = asyncio.Event(), []

    class StoppingSink(RecordingSink):
        async def advertise(self, pool: str, backend: str, images: int, images_per_s: float, ttl: float) -> None:
            await super().advertise(pool, backend, images, images_per_s, ttl)
            stop.set()

    def set_aside(pool: str, url: str) -> bool:
        asked_aside.append(url)
        if len(asked_aside) == 1:
            raise RuntimeError("health is not known yet")
        return False

    with capacity_stub() as (stub, url):
        client = UpstreamClient(connect_timeout=HANG, read_timeout=HANG)
        sink = StoppingSink()
        try:
            watcher = CapacityWatcher(client, {POOL: (url,)}, sink, every=0.001, timeout=HANG, set_aside=set_aside)
            await asyncio.wait_for(watcher.run(stop), HANG)
        finally:
            await client.close()
    assert stub.asked == 2
    assert sink.calls == [("advertise", POOL, url, 8, 3.5, 0.003)]
    errors = [record.getMessage() for record in capacity_log if record.levelno == logging.ERROR]
    assert errors == ["capacity: a round of polls failed: RuntimeError: health is not known yet"]


async def test_a_failing_sink_does_not_stop_the_others_and_is_logged_once(
    capacity_log: list[logging.LogRecord],
) -> None:
    class BrokenForOne(RecordingSink):
        broken = True

        async def advertise(self, pool: str, backend: str, images: int, images_per_s: float, ttl: float) -> None:
            if pool == "flaky" and self.broken:
                raise ConnectionError("the fleet's store is unreachable")
            await super().advertise(pool, backend, images, images_per_s, ttl)

    with capacity_stub() as (_, url):
        client = UpstreamClient(connect_timeout=HANG, read_timeout=HANG)
        sink = BrokenForOne()
        try:
            watcher = CapacityWatcher(client, {POOL: (url,), "flaky": (url,)}, sink)
            for now in range(3):
                await watcher.poll_once(float(now))
            sink.broken = False
            await watcher.poll_once(3.0)
        finally:
            await client.close()
    assert sink.fleet == {(POOL, url): (8, 3.5, 3.0), ("flaky", url): (8, 3.5, 3.0)}
    sink_lines = [record.getMessage() for record in capacity_log if "fleet's view" in record.getMessage()]
    assert sink_lines == [
        "capacity: could not report to the fleet's view: ConnectionError: the fleet's store is unreachable",
        "capacity: reports reach the fleet's view again",
    ]


def test_bad_intervals_are_refused_naming_the_setting() -> None:
    client = UpstreamClient(connect_timeout=1, read_timeout=1)
    for options, name in (
        ({"every": 0.0}, "every"),
        ({"every": float("nan")}, "every"),
        ({"timeout": -1.0}, "timeout"),
    ):
        with pytest.raises(ValueError, match=name):
            CapacityWatcher(client, {POOL: (DEAD,)}, RecordingSink(), **options)
