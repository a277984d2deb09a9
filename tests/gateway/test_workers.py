"""`quotagate serve --workers 2`: a scrape adds up every worker's counts, whichever worker answers it."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway.observe.metrics import MULTIPROC_ENV, shared_across_workers
from tests.support.keys import key_store
from tests.support.processes import gateway_processes
from tests.support.quotas import QUOTAS
from tests.support.upstream import StubUpstream

pytestmark = pytest.mark.anyio

PATH = "/v1/images/generations"
ALLOWED = {"plan": "pro", "route": PATH, "outcome": "allowed"}


@pytest.fixture
def gateway(tmp_path: Path, redis_url: str, upstream: StubUpstream) -> Iterator[tuple[str, Path]]:
    """Two uvicorn workers behind one port, sharing `metrics_dir`."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"stale")  # from a run before: must be cleaned
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS)
    env = {MULTIPROC_ENV: str(metrics_dir)}
    with gateway_processes(1, config, redis_url, upstream.url, tmp_path, workers=2, **env) as (served,):
        yield served.url, metrics_dir


def _allowed_by_worker(metrics_dir: Path) -> list[float]:
    """Each worker's own count of allowed requests, read from its file alone."""
    counts = []
    for db in sorted(metrics_dir.glob("counter_*.db")):
        with tempfile.TemporaryDirectory() as alone:
            shutil.copy(db, alone)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=alone)
            counts.append(registry.get_sample_value("quotagate_requests_total", ALLOWED) or 0.0)
    return counts


def _scraped_allowed(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "quotagate_requests_total" and sample.labels == ALLOWED:
                return sample.value
    raise AssertionError("quotagate_requests_total{outcome=allowed,plan=pro} is not exported")


@pytest.mark.slow
async def test_a_scrape_counts_every_workers_requests(gateway: tuple[str, Path], redis_url: str) -> None:
    url, metrics_dir = gateway
    redis = Redis.from_url(redis_url)
    key = await key_store(redis).create_key("acct-pro", "pro")
    await redis.aclose()
    sent = 0
    # A new connection per request, so the kernel hands them to both workers.
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for _ in range(20):
            answers = await asyncio.gather(
                *(client.post(PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"}) for _ in range(8))
            )
            assert [a.status_code for a in answers] == [200] * 8
            sent += 8
            if sum(1 for count in _allowed_by_worker(metrics_dir) if count) >= 2:
                break
        by_worker = _allowed_by_worker(metrics_dir)
        assert len([c for c in by_worker if c]) == 2 and sum(by_worker) == sent, by_worker
        texts = [(await client.get("/metrics")).text for _ in range(6)]
    assert [_scraped_allowed(text) for text in texts] == [sent] * 6
    # Gauges are combined too (not one series per worker): the version in force, nothing in flight.
    gauges = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(texts[-1])
        if family.type == "gauge"
        for sample in family.samples
    }
    assert not [labels for _, labels in gauges if "pid" in dict(labels)]
    assert [v for (name, _), v in gauges.items() if name == "quotagate_config_version_info"] == [1.0]
    assert gauges[("quotagate_in_flight_requests", (("plan", "pro"),))] == 0.0
    assert not (metrics_dir / "counter_1.db").exists()


def test_several_workers_get_a_fresh_metrics_dir_that_is_removed_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    with shared_across_workers(2):
        made = Path(os.environ[MULTIPROC_ENV])
        assert made.is_dir() and not list(made.iterdir())
    assert MULTIPROC_ENV not in os.environ and not made.exists()
    with shared_across_workers(1):
        assert MULTIPROC_ENV not in os.environ
