"""Hot reload: a changed quota file applies new limits, keeps every counter and drops no request;
a bad file is refused, logged with file, line, field and problem, and counted."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import reload
from gateway.config.quotas import Config, load_config, parse_config
from gateway.http.services import Services
from tests.support.keys import key_store
from tests.support.processes import Service, gateway_processes
from tests.support.quotas import QUOTAS
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PATH = "/v1/images/generations"
BODY = {"prompt": "a lighthouse", "n": 1}
APPLY_WITHIN = 2.0  # seconds: the promised bound for a change to reach every gateway


def with_free_daily(images: int) -> str:
    # pro's bucket is opened wide, so the load of the multi-process tests is never rate limited.
    wide = QUOTAS.replace("images: 6000, per: minute, burst: 100", "images: 600000, per: minute, burst: 10000")
    return wide.replace("daily_images: 3", f"daily_images: {images}")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client(
    redis_url: str, upstream: StubUpstream, quota_file: Path, registry: CollectorRegistry
) -> Iterator[TestClient]:
    # No watch task: the tests call poll() and reload() themselves, so nothing waits on time.
    settings = settings_for(redis_url, upstream.url, config_path=quota_file, config_poll_interval=0)
    with TestClient(create_app(settings, load_config(quota_file), registry=registry)) as client:
        yield client


@pytest.fixture
async def keys(redis_client: Redis) -> dict[str, str]:
    store = key_store(redis_client)
    return {plan: await store.create_key(f"acct-{plan}", plan) for plan in ("free", "pro")}


def services(client: TestClient) -> Services:
    return client.app.state.services  # type: ignore[attr-defined,no-any-return]


def generate(client: TestClient, key: str) -> httpx.Response:
    return client.post(PATH, json=BODY, headers={"Authorization": f"Bearer {key}"})


def reloads(registry: CollectorRegistry, result: str) -> float | None:
    return registry.get_sample_value("quotagate_config_reloads_total", {"result": result})


async def test_a_new_limit_applies_to_the_usage_already_counted(
    client: TestClient, keys: dict[str, str], quota_file: Path, registry: CollectorRegistry
) -> None:
    assert [generate(client, keys["free"]).status_code for _ in range(2)] == [200, 200]
    await anyio.Path(quota_file).write_text(with_free_daily(5))
    services(client).live_config.poll()

    answers = [generate(client, keys["free"]) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]  # 2 counted before + 3 = 5
    assert '"free-daily";q=5;w=86400' in answers[0].headers["RateLimit-Policy"]
    assert reloads(registry, "success") == 1
    version = services(client).config.version
    assert registry.get_sample_value("quotagate_config_version_info", {"version": version}) == 1
    assert client.get("/readyz").json()["config_version"] == version


async def test_an_unchanged_file_is_not_reloaded_nor_parsed(
    client: TestClient, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[str] = []

    def counted(text: str, source: str) -> Config:
        parsed.append(source)
        return parse_config(text, source)

    monkeypatch.setattr(reload, "parse_config", counted)
    for _ in range(3):
        services(client).live_config.poll()
    assert reloads(registry, "success") == reloads(registry, "failure") == 0
    assert parsed == []  # a poll that finds the same text does no more than read it


async def test_a_bad_file_is_refused_logged_and_counted_and_the_old_config_stays(
    client: TestClient,
    keys: dict[str, str],
    quota_file: Path,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = services(client).config.version
    await anyio.Path(quota_file).write_text(QUOTAS.replace("daily_images: 3", "daily_images: three"))
    live = services(client).live_config
    live.poll()  # maybe caught mid-save: not reported yet
    assert reloads(registry, "failure") == 0
    with caplog.at_level(logging.ERROR, logger="quotagate.reload"):
        live.poll()  # the same text again: refused

    assert reloads(registry, "failure") == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"{quota_file}:5: plans.free.daily_images: expected a whole number, got 'three'" in record.getMessage()
    assert services(client).config.version == before
    assert registry.get_sample_value("quotagate_config_version_info", {"version": before}) == 1
    assert [generate(client, keys["free"]).status_code for _ in range(4)] == [200, 200, 200, 429]
    live.poll()
    assert reloads(registry, "failure") == 1  # reported once, not at every poll


async def test_sighup_reports_a_bad_file_at_once(
    client: TestClient, quota_file: Path, registry: CollectorRegistry
) -> None:
    await anyio.Path(quota_file).write_text(QUOTAS.replace("per: minute, burst: 10", "per: fortnight, burst: 10"))
    assert services(client).live_config.reload() is False
    assert reloads(registry, "failure") == 1


async def test_a_route_to_a_pool_without_urls_is_refused(
    client: TestClient, quota_file: Path, registry: CollectorRegistry
) -> None:
    await anyio.Path(quota_file).write_text(QUOTAS.replace("upstream: diffusion", "upstream: video"))
    assert services(client).live_config.reload() is False
    assert services(client).config.routes[PATH].upstream == "diffusion"


async def test_a_deleted_file_is_refused(client: TestClient, quota_file: Path, registry: CollectorRegistry) -> None:
    await anyio.Path(quota_file).unlink()
    assert services(client).live_config.reload() is False
    assert services(client).config.plans["free"].limits.quotas[0].limit == 3


async def test_a_new_plan_is_exported_at_zero_once_loaded(
    client: TestClient, quota_file: Path, registry: CollectorRegistry
) -> None:
    team = "  team:\n    priority: 5\n    daily_images: 50\n    rate: {images: 60, per: minute, burst: 10}\n"
    await anyio.Path(quota_file).write_text(QUOTAS.replace("routes:\n", team + "routes:\n"))
    services(client).live_config.poll()
    labels = {"plan": "team", "route": PATH, "outcome": "allowed"}
    assert registry.get_sample_value("quotagate_requests_total", labels) == 0.0


# Two real gateway processes sharing one real redis-server.


class Load:
    """Requests sent to every gateway in turn by 8 concurrent clients, until stopped; what went wrong is kept."""

    def __init__(self, urls: list[str], key: str) -> None:
        self.failures: list[str] = []
        self.answered = 0
        self._urls, self._key = urls, key
        self._stop = asyncio.Event()
        self._progress = asyncio.Condition()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(*(self._sender(client, k) for k in range(8)))

    async def until_answered(self, count: int) -> None:
        """Return once `count` requests in all have been answered."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.answered >= count)

    def stop(self) -> None:
        self._stop.set()

    async def _sender(self, client: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            url = self._urls[i % len(self._urls)]
            i += 1
            try:
                answer = await client.post(f"{url}{PATH}", json=BODY, headers={"Authorization": f"Bearer {self._key}"})
                if answer.status_code != 200:
                    self.failures.append(f"{url}: {answer.status_code} {answer.text}")
            except httpx.HTTPError as exc:
                self.failures.append(f"{url}: {exc!r}")
            async with self._progress:
                self.answered += 1
                self._progress.notify_all()


async def _wait_for_version(gateways: list[Service], version: str) -> float:
    """Seconds until every gateway serves `version`; fails past APPLY_WITHIN."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=5) as client:
        for gateway in gateways:
            while (await client.get(f"{gateway.url}/readyz")).json()["config_version"] != version:
                assert time.monotonic() - started < APPLY_WITHIN, f"{gateway.url} still serves the old config"
                await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_two_gateways_reload_under_load_without_dropping_a_request(
    redis_url: str, upstream: StubUpstream, keys: dict[str, str], tmp_path: Path
) -> None:
    quota_file = tmp_path / "quotas.yaml"
    quota_file.write_text(with_free_daily(1000))
    with gateway_processes(2, quota_file, redis_url, upstream.url, tmp_path) as gateways:
        first, second = gateways
        free = {"Authorization": f"Bearer {keys['free']}"}
        async with httpx.AsyncClient(timeout=10) as client:
            for gateway in gateways:  # 2 of the free account's images counted before the change
                assert (await client.post(f"{gateway.url}{PATH}", json=BODY, headers=free)).status_code == 200

            load = Load([first.url, second.url], keys["pro"])
            running = asyncio.create_task(load.run())
            await load.until_answered(50)  # the load is flowing before the file changes
            quota_file.write_text(with_free_daily(3))
            await _wait_for_version(gateways, load_config(quota_file).version)
            await load.until_answered(load.answered + 100)  # and flows on after
            load.stop()
            await running
            assert load.failures == []

            # The new limit, on the old count: one more image on either gateway, then 429 on both.
            assert (await client.post(f"{first.url}{PATH}", json=BODY, headers=free)).status_code == 200
            for gateway in gateways:
                refused = await client.post(f"{gateway.url}{PATH}", json=BODY, headers=free)
                assert refused.status_code == 429, gateway.logged()
                assert '"free-daily";q=3' in refused.headers["RateLimit-Policy"]

        for gateway in gateways:
            assert gateway.metric("quotagate_config_reloads_total", result="success") == 1

        # A bad file: both refuse it, log file:line: field: problem, count it, and keep serving the old one.
        kept = load_config(quota_file).version
        quota_file.write_text(with_free_daily(3).replace("burst: 10", "burst: 0"))
        deadline = time.monotonic() + APPLY_WITHIN
        for gateway in gateways:
            while gateway.metric("quotagate_config_reloads_total", result="failure") != 1:
                assert time.monotonic() < deadline, gateway.logged()
                await asyncio.sleep(0.05)
            assert f"{quota_file}:6: plans.free.rate.burst: must be at least 1, got 0" in gateway.logged()
            assert gateway.version() == kept


async def test_sighup_reloads_every_worker(
    redis_url: str, upstream: StubUpstream, keys: dict[str, str], tmp_path: Path
) -> None:
    quota_file = tmp_path / "quotas.yaml"
    quota_file.write_text(QUOTAS)
    # No file watch: only the signal can make the change.
    with gateway_processes(1, quota_file, redis_url, upstream.url, tmp_path, workers=2, QUOTAGATE_CONFIG_POLL="0") as (
        gw,
    ):
        quota_file.write_text(with_free_daily(7))
        new = load_config(quota_file).version
        assert gw.version() != new
        gw.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + APPLY_WITHIN
        # Both workers take it: fresh connections land on either, so 20 in a row must all answer
        # with the new version before the deadline.
        versions: set[str] = set()
        while versions != {new}:
            assert time.monotonic() < deadline, (versions, gw.logged())
            versions = set()
            for _ in range(20):
                async with httpx.AsyncClient() as fresh:
                    versions.add((await fresh.get(f"{gw.url}/readyz")).json()["config_version"])
        assert gw.process.poll() is None
