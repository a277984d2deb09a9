"""A fleet to attack the reservation line with: real gateway processes on one Redis, before one image service
that advertises what a test tells it and holds what it is told (tests/adversarial/lying_backend.py).

Everything is read from the outside: answers, `/v1/quota`, and the image service's own count of what it held.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx

from tests.ports import free_port
from tests.support.keys import new_key
from tests.support.processes import Service, ServiceSet
from tests.support.quotas import quota_file

PATH = "/v1/images/generations"
HANG = 30.0  # seconds: a bound on a hang, not a timing assertion
# Turns far away (100 s an image): while a test runs, no ticket's turn comes by the clock.
SLOW = 0.01


def reading(slots: Any = 1, images_per_s: Any = SLOW, **more: Any) -> str:
    """A well-formed capacity reading, as the real backend writes it."""
    values = {"slots": slots, "queue_images": 0, "queued_images": 0, "running_images": 0}
    return json.dumps({**values, "images_per_s": images_per_s, "ready": True, **more})


def auth(key: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **more}


def until(check: Callable[[], bool], what: str, limit: float = HANG) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


@dataclass
class Fleet:
    """`gateways` on one Redis before the one `backend`; `client` talks to all of them."""

    services: ServiceSet
    redis_url: str
    backend: Service
    gateways: list[Service] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=HANG))

    def start_gateway(self) -> Service:
        """One more `quotagate serve` on the same Redis, quota file and image service, awaited."""
        config = self.services.tmp / "quotas.yaml"
        gateway = self.services.gateway(None, config, self.redis_url, self.backend.url, self.settings)
        gateway.wait_ready("/readyz")
        self.gateways.append(gateway)
        return gateway

    def key(self, account: str, plan: str = "free") -> str:
        key = new_key(self.redis_url, account, plan)
        self.services.secrets.append(key)
        return key

    def control(self, **wanted: Any) -> None:
        """Tell the image service what to advertise and how to behave (lying_backend's `/control`)."""
        httpx.post(f"{self.backend.url}/control", json=wanted).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.backend.url}/stats").json())

    def advertise(self, text: str) -> None:
        """Advertise `text` and wait until every gateway has read it (its fleet capacity gauge moved)."""
        self.control(advertise=text)
        values = json.loads(text)
        slots, rate = values["slots"] + values["queue_images"], values["images_per_s"]
        for gateway in self.gateways:
            until(partial(_reads, gateway, slots, rate), f"{gateway.name} reads {text}")

    def post(
        self, gateway: Service, key: str, *, n: int = 1, asynchronous: bool = False, idempotency_key: str = ""
    ) -> httpx.Response:
        """A request for `n` images; `asynchronous` asks for a job (`Prefer: respond-async`)."""
        headers = auth(key)
        if asynchronous:
            headers["Prefer"] = "respond-async"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self.client.post(f"{gateway.url}{PATH}", json={"prompt": "x", "n": n}, headers=headers)

    def job(self, gateway: Service, key: str, n: int = 1) -> httpx.Response:
        """An async job asked for; fails the test unless it was accepted."""
        accepted = self.post(gateway, key, n=n, asynchronous=True)
        assert accepted.status_code == 202, accepted.text
        return accepted

    def read_job(self, gateway: Service, location: str, key: str) -> httpx.Response:
        return self.client.get(f"{gateway.url}{location}", headers=auth(key))

    def ended(self, gateway: Service, location: str, key: str) -> dict[str, Any]:
        """The job once it is neither queued nor running."""
        until(
            lambda: self.read_job(gateway, location, key).json()["status"] not in ("queued", "running"),
            f"the job {location} ends",
        )
        return dict(self.read_job(gateway, location, key).json())

    def used(self, key: str) -> int:
        """Images charged today to `key`'s account, as `/v1/quota` tells it."""
        usage = self.client.get(f"{self.gateways[-1].url}/v1/quota", headers=auth(key)).json()
        (daily,) = [limit for limit in usage["limits"] if limit["kind"] == "daily"]
        return int(daily["used"])

    def hold(self, gateway: Service, key: str, places: int = 1) -> None:
        """Fill the image service's places with requests of `key` it holds (its gate closed), sent in the
        background; `release` lets them go."""
        self.control(gate="closed")
        held = self.stats()["held"]
        for _ in range(places):
            _in_background(self.client, f"{gateway.url}{PATH}", key)
        until(lambda: self.stats()["held"] == held + places, "the places are held")


def lying_backend(services: ServiceSet, name: str = "liar") -> Service:
    port = free_port()
    backend = services.spawn(name, [sys.executable, "-m", "tests.adversarial.lying_backend", str(port)], port)
    backend.wait_ready()
    return backend


def fleet(
    services: ServiceSet,
    redis_url: str,
    quotas: str,
    advertised: str,
    *,
    hold_limit: int,
    replicas: int = 1,
    **env: str,
) -> Fleet:
    """A fleet of `replicas` gateways reading `quotas`, before an image service advertising `advertised` and
    holding at most `hold_limit` images."""
    backend = lying_backend(services)
    started = Fleet(
        services, redis_url, backend, settings={"QUOTAGATE_CAPACITY_POLL": "0.2", "QUOTAGATE_PLACE_TTL": "2", **env}
    )
    started.control(advertise=advertised, hold_limit=hold_limit)
    quota_file(services.tmp, quotas)
    for _ in range(replicas):
        started.start_gateway()
    started.advertise(advertised)
    return started


def _reads(gateway: Service, slots: int, rate: float) -> bool:
    """Whether `gateway` reads the pool's capacity and drain rate as advertised."""
    capacity = gateway.metric("quotagate_fleet_capacity_images", pool="diffusion")
    drain = gateway.metric("quotagate_fleet_drain_images_per_second", pool="diffusion")
    return capacity == slots and drain is not None and abs(drain - rate) < 1e-9


def _in_background(client: httpx.Client, url: str, key: str) -> None:
    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # its gateway was killed
            client.post(url, json={"prompt": "x"}, headers=auth(key))

    threading.Thread(target=send, daemon=True).start()
