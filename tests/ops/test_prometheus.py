"""A real Prometheus scrapes running gateways and backends; every alert must fire and every dashboard query answer.

The alert rules are loaded as shipped. Before anything goes wrong none of them holds; then each
condition is made to happen for real, and each alert must go pending or firing while it holds:
- a burst of pro requests fills the real backend, and the gateway tells the rest their turn (shed);
  requests sent to that backend past the gateway find its queue full;
- a second gateway's Redis is killed, and that gateway is asked;
- in a second pool, a backend that advertises one image at 0.01 images a second holds its image while
  async jobs wait in the pro line, told 100 s, 200 s, ...: the line waits long and the brownout rule
  watching it applies; then the backend lets go and the jobs start at once, far from the waits they
  were told (the ETA error); then that backend stops, and its pool has no capacity;
- the quota file is broken.
Every query of the Grafana dashboard must then parse and return data.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.ops.embedded_redis import RedisServer
from limits import connect
from tests.ports import free_port
from tests.support.keys import key_store
from tests.support.processes import ROOT, Service, ServiceSet
from tests.support.quotas import IMAGES as PATH
from tests.support.quotas import plan, quota_file

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ALERTS = ROOT / "config/prometheus/alerts.yml"
DASHBOARD = ROOT / "config/grafana/quotagate.json"
DATA_TIMEOUT = 30.0
# What Grafana puts in place of the dashboard's variables before it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$plan": ".*"}

SPARE = "/v1/images/edits"  # the route to the second pool
SPARE_RATE = 0.01  # images a second its backend advertises: a wait of 100 s per image ahead
JOBS = 20  # QuotagateEtaInaccurate judges the median of at least 20 jobs
QUOTAS = (
    "timezone: UTC\nplans:\n"
    + plan("free", daily=2, rate=6000, burst=1000)
    + plan("pro", priority=10, daily="unlimited", rate=6000, burst=1000, concurrency=JOBS + 2)
    + f"""routes:
  - {{path: {PATH}, upstream: diffusion, cost: images}}
  - {{path: {SPARE}, upstream: spare, cost: images}}
pools:
  diffusion: {{reserved_for_paid: 0.5}}  # its backend holds 2 images: free may take 1
brownout:
  - name: pro-waits
    line: pro
    waits_over: 0
    for: 0
    apply: {{plan: free, daily_images: 1}}
    reason: paid requests wait for their turn
"""
)
BODY = {"prompt": "a lighthouse", "n": 1, "size": "64x64", "response_format": "b64_json"}
SLOW = {**BODY, "size": "256x256", "steps": 4}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """Every panel's PromQL, with Grafana's variables put in as Grafana would."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append(expr)
    return queries


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` gives now; fails if Prometheus refuses to parse it."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", f"{expr}: {answer}"
        return list(answer["data"]["result"])

    def alerts(self) -> dict[str, str]:
        """State (pending, firing) of each active alert, by name."""
        answer = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()
        return {alert["labels"]["alertname"]: alert["state"] for alert in answer["data"]["alerts"]}

    async def wait_for(self, what: str, missing: Callable[[], list[str]]) -> None:
        """Poll until nothing is `missing`; fail naming what still was at the deadline."""
        await _until(f"Prometheus to see {what}", missing)

    async def expect_alerts(self, seen: set[str], *names: str) -> None:
        """Wait until each alert of `names` is pending or firing (its condition holds), and add them to `seen`."""
        # Prometheus lists only the alerts that are pending or firing.
        await self.wait_for(f"{', '.join(names)} pending or firing", lambda: sorted(set(names) - set(self.alerts())))
        seen.update(names)


async def _until(what: str, missing: Callable[[], list[str]]) -> None:
    """Poll until nothing is `missing`, letting the test's other requests go on; fail naming what still was."""
    deadline = time.monotonic() + DATA_TIMEOUT
    while left := missing():
        assert time.monotonic() < deadline, f"waited {DATA_TIMEOUT:g} s for {what}: still missing {left}"
        await asyncio.sleep(0.25)


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    assert found, "Debian's prometheus is not installed: `make setup` installs it"
    return found


def _start_prometheus(
    services: ServiceSet, binary: str, gateways: list[Service], backend: Service
) -> tuple[Service, Prometheus]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "quotagate-gateway", "static_configs": [{"targets": [_host(g) for g in gateways]}]},
            {"job_name": "quotagate-backend", "static_configs": [{"targets": [_host(backend)]}]},
        ],
    }
    path = services.tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    command = [
        binary, f"--config.file={path}", f"--storage.tsdb.path={services.tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    return services.spawn("prometheus", command, port), Prometheus(f"http://127.0.0.1:{port}")


def _host(service: Service) -> str:
    return service.url.removeprefix("http://")


@pytest.fixture
def quotas(tmp_path: Path) -> Path:
    return quota_file(tmp_path, QUOTAS)


async def _keys(redis_url: str) -> dict[str, str]:
    redis = connect(redis_url)
    try:
        store = key_store(redis)
        made = {plan: await store.create_key(f"acct-{plan}", plan) for plan in ("free", "pro")}
        return {**made, "pro-jobs": await store.create_key("acct-pro-jobs", "pro")}
    finally:
        await redis.aclose()


async def _send(
    client: httpx.AsyncClient, url: str, key: str | None, count: int, body: Any = BODY, path: str = PATH
) -> list[int]:
    """`count` requests at once; the statuses of their answers."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answers = await asyncio.gather(*(client.post(url + path, json=body, headers=headers) for _ in range(count)))
    return [answer.status_code for answer in answers]


async def _job(client: httpx.AsyncClient, url: str, key: str) -> float:
    """An async job on the second pool, which must wait its turn: the wait it is told, in seconds."""
    headers = {"Authorization": f"Bearer {key}", "Prefer": "respond-async"}
    answer = await client.post(url + SPARE, json=BODY, headers=headers)
    assert answer.status_code == 202, answer.text
    return float(answer.json()["eta_s"])


def _capacity(gateway: Service, pool: str) -> float:
    return gateway.metric("quotagate_fleet_capacity_images", pool=pool) or 0.0


async def test_every_alert_and_dashboard_query_works_on_a_real_prometheus(
    tmp_path: Path, quotas: Path, redis_url: str, prometheus_binary: str
) -> None:
    services = ServiceSet(tmp_path)
    orphan_redis = RedisServer(tmp_path / "orphan-redis")
    try:
        await _run(services, orphan_redis, quotas, redis_url, prometheus_binary)
    finally:
        services.stop()
        orphan_redis.stop()


async def _run(
    services: ServiceSet, orphan_redis: RedisServer, quotas: Path, redis_url: str, prometheus_binary: str
) -> None:
    backend = services.backend(
        Path("tiny"), "--data-dir", str(services.tmp / "backend"),
        "--max-batch-images", "1", "--max-queue", "1", "--max-n", "1", "--max-wait-ms", "0",
    )  # fmt: skip
    spare = services.capacity_backend(1, 0, SPARE_RATE, name="spare")
    pools = ("--upstream", f"spare={spare.url}")
    gateway = services.gateway("gateway", quotas, redis_url, backend.url, {"QUOTAGATE_CONFIG_POLL": "0.2"},
                               "--workers", "2", *pools)  # fmt: skip
    # A second gateway, on a Redis of its own that is killed later.
    orphan_redis.start()
    orphan_config = services.tmp / "orphan.yaml"
    orphan_config.write_text(QUOTAS)
    orphan = services.gateway("orphan", orphan_config, orphan_redis.url, backend.url, None, *pools)
    server, prometheus = _start_prometheus(services, prometheus_binary, [gateway, orphan], backend)
    for service in (gateway, orphan, spare):
        service.wait_ready()
    server.wait_ready("/-/ready")
    backend.wait_ready("/readyz", timeout=120)
    keys = await _keys(redis_url)
    # The gateway polls the backends every second: the first requests wait until it knows the model loaded.
    await _until(
        "the pools' capacity", lambda: [p for p, n in (("diffusion", 2), ("spare", 1)) if _capacity(gateway, p) != n]
    )
    seen: set[str] = set()

    # A new connection per request, so both workers of the gateway get some.
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        # Ordinary traffic: images for both plans, then the free plan's daily quota runs out.
        assert await _send(client, gateway.url, keys["pro"], 1) == [200]
        assert await _send(client, gateway.url, keys["free"], 1) == [200]
        # One at a time: free may hold one of the pool's two places, so a second at once would wait its turn.
        assert await _send(client, gateway.url, keys["free"], 1) == [200]
        assert await _send(client, gateway.url, keys["free"], 1) == [429]
        seen_traffic = 'quotagate_requests_total{outcome=~"allowed|quota_exhausted"}'
        await prometheus.wait_for(
            "the ordinary traffic", lambda: [] if _total(prometheus, seen_traffic) == 4 else ["it"]
        )
        # rate() needs a sample from before the refusals: a backend first scraped after them shows a
        # counter that never rose, and its alert could never hold.
        refused = 'quotagate_backend_rejections_total{reason="queue_full"}'
        await prometheus.wait_for(
            "the backend's refusals at zero", lambda: [] if prometheus.query(refused) else [refused]
        )
        capacity = "max by (pool) (quotagate_fleet_capacity_images) > 0"
        await prometheus.wait_for(
            "both pools' capacity", lambda: [] if len(prometheus.query(capacity)) == 2 else [capacity]
        )
        for rule in alert_rules():
            assert prometheus.query(rule["expr"]) == [], f"{rule['alert']} holds before anything went wrong"

        # A burst of slow pro images: the backend's two places are taken, and the rest are told their turn (503).
        burst = await _send(client, gateway.url, keys["pro"], 4, SLOW)
        assert 200 in burst and 503 in burst, burst
        assert backend.metric("quotagate_backend_rejections_total", reason="queue_full") == 0  # none sent past it
        # Sent to the backend past the gateway, slow images find its queue of one full.
        while not backend.metric("quotagate_backend_rejections_total", reason="queue_full"):
            statuses = await _send(client, backend.url, None, 3, SLOW)
            assert set(statuses) <= {200, 503}, statuses
        orphan_redis.kill()
        assert await _send(client, orphan.url, keys["pro"], 3) == [503, 503, 503]
        await prometheus.expect_alerts(
            seen, "QuotagateSheddingSustained", "QuotagateBackendQueueSaturated", "QuotagateRedisErrors"
        )

        # The second pool: its one place held, async jobs wait their turn in the pro line.
        await client.post(spare.url + "/gate/close")
        held = asyncio.ensure_future(_send(client, gateway.url, keys["pro"], 1, path=SPARE))
        await _until("the spare backend holding an image", lambda: [] if _held(spare) == 1 else ["it"])
        told = [await _job(client, gateway.url, keys["pro-jobs"]) for _ in range(JOBS)]
        assert told == sorted(told) and told[0] > 0 and told[-1] > 300, told  # a later job never told sooner
        await prometheus.expect_alerts(seen, "QuotagateLineWaitLong", "QuotagateBrownout")
        # Let go: every job starts within seconds of the place coming free, far sooner than it was told.
        await client.post(spare.url + "/gate/open")
        assert await held == [200]
        await _until("every job done", lambda: [] if _jobs_done(gateway) == JOBS else ["some"])
        await prometheus.expect_alerts(seen, "QuotagateEtaInaccurate")

    # The second pool's only backend stops: nothing advertises room there.
    spare.stop()
    await prometheus.expect_alerts(seen, "QuotagateNoCapacity")
    await asyncio.to_thread(quotas.write_text, "plans: [this is not a quota file\n")
    await prometheus.expect_alerts(seen, "QuotagateConfigReloadFailed")

    assert seen == {rule["alert"] for rule in alert_rules()}, "alerts this test never makes happen"
    empty = [expr for expr in dashboard_queries() if not prometheus.query(expr)]
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)


def _held(capacity_backend: Service) -> int:
    """Images the backend of tests/support/capacity_backend.py holds now."""
    return int(httpx.get(capacity_backend.url + "/stats", timeout=5).json()["held"])


def _jobs_done(gateway: Service) -> float | None:
    return gateway.metric("quotagate_jobs_total", plan="pro", status="done")


def _total(prometheus: Prometheus, selector: str) -> float:
    return sum(float(sample["value"][1]) for sample in prometheus.query(f"sum({selector})"))
