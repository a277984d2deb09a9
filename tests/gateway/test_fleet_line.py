"""The pool's capacity is the fleet's: real gateway processes on one Redis before image services that
advertise what they hold and count it.

- However many replicas, the services never hold more than they advertise, and a SIGKILLed replica's
  places come back when their leases lapse.
- A request that finds no place is told its position and turn; the line is first come, first served.
- An async job lives in Redis: any replica answers for it and runs it, after its replica is killed too;
  only its account sees it; cancelled before it starts, it costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.keys import create_key
from tests.support.processes import Service, ServiceSet
from tests.support.quotas import plan, quota_file, quotas_yaml

pytestmark = pytest.mark.slow

PATH = "/v1/images/generations"
HANG = 20.0  # seconds: a bound on a hang, not a timing assertion
QUOTAS = quotas_yaml(
    plan("free", daily=3, rate=600, burst=100, concurrency=3),
    plan("pro", priority=10, daily="unlimited", rate=60000, burst=1000, concurrency=64),
    pool="reserved_for_paid: 0",
)
# Turns far away: while a test runs, no ticket's turn comes by the clock, so who is let in depends on order alone.
SLOW_RATE = 0.01


@pytest.fixture
def services(tmp_path: Path) -> Iterator[ServiceSet]:
    started = ServiceSet(tmp_path)
    yield started
    started.stop()


def gateways(services: ServiceSet, count: int, redis_url: str, backends: list[Service], **env: str) -> list[Service]:
    config = quota_file(services.tmp, QUOTAS)
    upstream = ",".join(b.url for b in backends)
    settings = {"QUOTAGATE_CAPACITY_POLL": "0.2", "QUOTAGATE_PLACE_TTL": "2", **env}
    started = [services.gateway(None, config, redis_url, upstream, settings) for _ in range(count)]
    for gateway in started:
        gateway.wait_ready("/readyz")
    return started


def stats(backend: Service) -> dict[str, Any]:
    return dict(httpx.get(f"{backend.url}/stats").json())


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def key_for(redis_url: str, account: str, plan_name: str = "pro") -> str:
    return asyncio.run(create_key(redis_url, account, plan_name))


def auth(key: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **more}


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_the_services_never_hold_more_than_they_advertise_whatever_the_replicas(
    services: ServiceSet, redis_url: str, replicas: int
) -> None:
    backends = [services.capacity_backend(2, 1, 5.0, name=f"capacity-{i}") for i in range(2)]  # 6 images in all
    for backend in backends:
        backend.wait_ready()
        httpx.post(f"{backend.url}/gate/close")
    running = gateways(services, replicas, redis_url, backends)
    key = key_for(redis_url, "many")

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=HANG) as client:
            pending = [
                asyncio.ensure_future(
                    client.post(f"{running[i % replicas].url}{PATH}", json={"prompt": "x"}, headers=auth(key))
                )
                for i in range(30)
            ]
            deadline = time.monotonic() + HANG
            # The services hold 6 images; every other request has its answer (a turn in the line) meanwhile.
            while sum(p.done() for p in pending) < 24 or sum(stats(b)["held"] for b in backends) < 6:
                done, held = sum(p.done() for p in pending), [stats(b)["held"] for b in backends]
                assert time.monotonic() < deadline, f"the requests past the capacity were not answered: {done} {held}"
                await asyncio.sleep(0.02)
            for backend in backends:
                await client.post(f"{backend.url}/gate/open")
            return list(await asyncio.gather(*pending))

    answers = asyncio.run(flood())
    assert sorted(a.status_code for a in answers) == [200] * 6 + [503] * 24
    assert all(a.headers["Retry-After"].isdigit() for a in answers if a.status_code == 503)
    assert sum(stats(b)["most_held"] for b in backends) <= 6
    assert all(stats(b)["most_held"] <= 3 and stats(b)["refused"] == 0 for b in backends)


def test_a_killed_replicas_places_come_back_when_their_leases_lapse(services: ServiceSet, redis_url: str) -> None:
    backend = services.capacity_backend(2, 0, 5.0)
    backend.wait_ready()
    httpx.post(f"{backend.url}/gate/close")
    doomed, survivor = gateways(services, 2, redis_url, [backend])
    key = key_for(redis_url, "holder")
    with httpx.Client(timeout=HANG) as client:
        held = [_in_background(client, f"{doomed.url}{PATH}", key) for _ in range(2)]
        until(lambda: stats(backend)["held"] == 2, "the doomed replica holds both places")
        assert client.post(f"{survivor.url}{PATH}", json={"prompt": "x"}, headers=auth(key)).status_code == 503
        doomed.kill()
        for thread in held:
            thread.join()
        until(lambda: stats(backend)["held"] == 0, "the service dropped the dead replica's requests")
        httpx.post(f"{backend.url}/gate/open")
        # Its places lapse (QUOTAGATE_PLACE_TTL=2 s) and the survivor may use them again.
        until(
            lambda: client.post(f"{survivor.url}{PATH}", json={"prompt": "x"}, headers=auth(key)).status_code == 200,
            "the dead replica's places came back",
        )
    assert stats(backend)["most_held"] <= 2 and stats(backend)["refused"] == 0


def _in_background(client: httpx.Client, url: str, key: str) -> threading.Thread:
    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # its gateway was killed
            client.post(url, json={"prompt": "x"}, headers=auth(key))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_the_line_is_first_come_first_served(services: ServiceSet, redis_url: str) -> None:
    backend = services.capacity_backend(1, 0, SLOW_RATE)
    backend.wait_ready()
    httpx.post(f"{backend.url}/gate/close")
    one, two = gateways(services, 2, redis_url, [backend])
    keys = {name: key_for(redis_url, name) for name in ("holder", "a", "b", "c", "late")}
    with httpx.Client(timeout=HANG) as client:
        holder = _in_background(client, f"{one.url}{PATH}", keys["holder"])
        until(lambda: stats(backend)["held"] == 1, "the one place is held")

        def ask(gateway: Service, who: str) -> httpx.Response:
            return client.post(f"{gateway.url}{PATH}", json={"prompt": "x"}, headers=auth(keys[who]))

        told = [ask(gateway, who) for gateway, who in ((one, "a"), (two, "b"), (one, "c"))]
        assert [t.status_code for t in told] == [503, 503, 503]
        assert [t.headers["Quotagate-Line"].split(",")[0] for t in told] == ["position=1", "position=2", "position=3"]
        waits = [int(t.headers["Retry-After"]) for t in told]
        assert waits == sorted(waits) and waits[0] < waits[-1]
        httpx.post(f"{backend.url}/gate/open")
        holder.join()
        # The place is free; it is a's. Whoever comes back first, the line goes in order.
        assert ask(two, "c").status_code == 503
        assert ask(one, "late").headers["Quotagate-Line"].startswith("position=4")
        assert ask(one, "b").status_code == 503
        assert ask(two, "a").status_code == 200
        assert ask(one, "c").status_code == 503
        assert ask(two, "b").status_code == 200
        assert ask(one, "c").status_code == 200
    assert stats(backend)["arrivals"] == ["holder", "a", "b", "c"]


def test_an_async_job_survives_its_replica_and_is_its_accounts_alone(services: ServiceSet, redis_url: str) -> None:
    backend = services.capacity_backend(1, 0, SLOW_RATE)
    backend.wait_ready()
    httpx.post(f"{backend.url}/gate/close")
    doomed, survivor = gateways(services, 2, redis_url, [backend])
    owner, stranger, holder = (key_for(redis_url, who, "free") for who in ("owner", "stranger", "holder"))
    with httpx.Client(timeout=HANG) as client:
        held = _in_background(client, f"{survivor.url}{PATH}", holder)
        until(lambda: stats(backend)["held"] == 1, "the one place is held")
        accepted = client.post(f"{doomed.url}{PATH}", json={"prompt": "x"}, headers=auth(owner, Prefer="respond-async"))
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert accepted.headers["Location"] == f"/v1/images/jobs/{job['id']}"
        assert (job["status"], job["position"]) == ("queued", 1)
        doomed.kill()
        url = f"{survivor.url}{accepted.headers['Location']}"
        assert client.get(url, headers=auth(stranger)).status_code == 404
        assert client.delete(url, headers=auth(stranger)).status_code == 404
        queued = client.get(url, headers=auth(owner)).json()
        assert (queued["status"], queued["position"]) == ("queued", 1)
        httpx.post(f"{backend.url}/gate/open")
        held.join()
        until(lambda: client.get(url, headers=auth(owner)).json()["status"] == "done", "the job is done")
        done = client.get(url, headers=auth(owner)).json()
        assert len(done["result"]["data"]) == 1
        usage = client.get(f"{survivor.url}/v1/quota", headers=auth(owner)).json()
    assert _used_today(usage) == 1
    assert stats(backend)["arrivals"] == ["holder", "owner"]


def test_a_job_cancelled_before_it_starts_costs_nothing_and_never_runs(services: ServiceSet, redis_url: str) -> None:
    backend = services.capacity_backend(1, 1, SLOW_RATE)
    backend.wait_ready()
    httpx.post(f"{backend.url}/gate/close")
    (gateway,) = gateways(services, 1, redis_url, [backend])
    owner, holder = key_for(redis_url, "owner", "free"), key_for(redis_url, "holder", "free")
    with httpx.Client(timeout=HANG) as client:
        held = _in_background(client, f"{gateway.url}{PATH}", holder)
        until(lambda: stats(backend)["held"] == 1, "the one place is held")
        accepted = client.post(
            f"{gateway.url}{PATH}", json={"prompt": "x", "n": 2}, headers=auth(owner, Prefer="respond-async")
        )
        assert accepted.status_code == 202, accepted.text
        url = f"{gateway.url}{accepted.headers['Location']}"
        cancelled = client.delete(url, headers=auth(owner))
        assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
        assert client.get(url, headers=auth(owner)).json()["status"] == "cancelled"
        httpx.post(f"{backend.url}/gate/open")
        held.join()
        # The place is free again, and the cancelled job does not take it: a newcomer does.
        assert client.post(f"{gateway.url}{PATH}", json={"prompt": "x"}, headers=auth(owner)).status_code == 200
        usage = client.get(f"{gateway.url}/v1/quota", headers=auth(owner)).json()
    assert _used_today(usage) == 1  # the one image made, not the two cancelled
    assert stats(backend)["arrivals"] == ["holder", "owner"]


def _used_today(usage: dict[str, Any]) -> int:
    (daily,) = [limit for limit in usage["limits"] if limit["kind"] == "daily"]
    return int(daily["used"])


BROWNOUT = """brownout:
  - name: free-one-a-day
    line: free
    waits_over: 0
    for: 0
    apply: {plan: free, daily_images: 1}
    reason: GPUs saturated
"""


def test_a_brownout_applies_itself_while_the_free_line_waits_and_lifts_itself_when_it_empties(
    services: ServiceSet, redis_url: str
) -> None:
    backend = services.capacity_backend(1, 0, SLOW_RATE)
    backend.wait_ready()
    httpx.post(f"{backend.url}/gate/close")
    config = quota_file(services.tmp, QUOTAS + BROWNOUT)
    settings = {"QUOTAGATE_CAPACITY_POLL": "0.2", "QUOTAGATE_PLACE_TTL": "2"}
    gateway = services.gateway(None, config, redis_url, backend.url, settings)
    gateway.wait_ready("/readyz")
    holder, waiting, watcher = (key_for(redis_url, who, "free") for who in ("holder", "waiting", "watcher"))

    def daily_limit() -> int:
        usage = httpx.get(f"{gateway.url}/v1/quota", headers=auth(watcher)).json()
        (daily,) = [limit for limit in usage["limits"] if limit["kind"] == "daily"]
        return int(daily["limit"])

    assert daily_limit() == 3
    with httpx.Client(timeout=HANG) as client:
        held = _in_background(client, f"{gateway.url}{PATH}", holder)
        until(lambda: stats(backend)["held"] == 1, "the one place is held")
        assert client.post(f"{gateway.url}{PATH}", json={"prompt": "x"}, headers=auth(waiting)).status_code == 503
        until(lambda: daily_limit() == 1, "the brownout applied itself while the free line waited")
        assert gateway.metric("quotagate_brownout_active", rule="free-one-a-day") == 1
        httpx.post(f"{backend.url}/gate/open")
        held.join()
        # Its turn: the line empties, and the brownout lifts itself.
        assert client.post(f"{gateway.url}{PATH}", json={"prompt": "x"}, headers=auth(waiting)).status_code == 200
        until(lambda: daily_limit() == 3, "the brownout lifted itself once the line was empty")
    assert gateway.metric("quotagate_brownout_active", rule="free-one-a-day") == 0


def test_a_backend_that_comes_up_between_polls_serves_the_first_request_that_needs_it(
    services: ServiceSet, redis_url: str
) -> None:
    port_holder = services.capacity_backend(2, 0, 5.0)  # named now, started below: its URL is the gateway's upstream
    port_holder.kill()
    config = quota_file(services.tmp, QUOTAS)
    # Polls a minute apart: only the request itself can find that the backend came up.
    gateway = services.gateway(None, config, redis_url, port_holder.url, {"QUOTAGATE_CAPACITY_POLL": "60"})
    gateway.wait_ready("/readyz")
    key = key_for(redis_url, "first")
    turned = httpx.post(f"{gateway.url}{PATH}", json={"prompt": "x"}, headers=auth(key), timeout=HANG)
    assert turned.status_code == 503 and "No image service" in turned.json()["error"]["message"]
    port = port_holder.url.rsplit(":", 1)[1]
    backend = services.spawn(
        "capacity-late", [sys.executable, "-m", "tests.support.capacity_backend", port, "2", "0"], int(port)
    )
    backend.wait_ready()
    # Well before the next poll (a minute away), a request finds it.
    until(
        lambda: (
            httpx.post(f"{gateway.url}{PATH}", json={"prompt": "x"}, headers=auth(key), timeout=HANG).status_code == 200
        ),
        "a request found the backend that came up",
    )
