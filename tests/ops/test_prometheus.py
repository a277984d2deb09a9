"""A real Prometheus scrapes a running gateway and backend; every dashboard and alert query must answer.

The alert rules are loaded as shipped. Before anything goes wrong none of them holds; then each
condition is made to happen for real (a burst the pool sheds and the backend's queue refuses, a
gateway whose Redis is gone, a quota file that does not load) and each alert must go pending or
firing. Every query of the Grafana dashboard must then parse and return data.
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
from prometheus_client.parser import text_string_to_metric_families

from limits import connect
from tests.ports import free_port
from tests.support.keys import key_store
from tests.support.processes import ROOT, Service, ServiceSet
from tests.support.quotas import IMAGES as PATH
from tests.support.quotas import plan, quota_file, quotas_yaml

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ALERTS = ROOT / "config/prometheus/alerts.yml"
DASHBOARD = ROOT / "config/grafana/quotagate.json"
DATA_TIMEOUT = 30.0
# What Grafana puts in place of the dashboard's variables before it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$plan": ".*"}

QUOTAS = quotas_yaml(
    plan("free", daily=2, rate=6000, burst=1000),
    plan("pro", priority=10, daily="unlimited", rate=6000, burst=1000),
    pool="max_in_flight: 4, reserved_for_paid: 0.75",  # per worker: free may hold 1 place, pro 4
)
BODY = {"prompt": "a lighthouse", "n": 1, "size": "64x64", "response_format": "b64_json"}
SLOW = {**BODY, "size": "256x256", "steps": 4}


# Alerts this stack does not make happen, and the test that proves each with Prometheus's rule engine instead.
# The quota file here has no brownout rule, so no gateway exports quotagate_brownout_active.
PROVED_ELSEWHERE = {"QuotagateBrownout": "tests/ops/test_deployment_files.py (promtool test rules)"}


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

    def wait_for(self, what: str, missing: Callable[[], list[str]]) -> None:
        """Poll until nothing is `missing`; fail naming what still was at the deadline."""
        deadline = time.monotonic() + DATA_TIMEOUT
        while left := missing():
            assert time.monotonic() < deadline, f"Prometheus never saw {what}: still missing {left}"
            time.sleep(0.25)


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
        return {**made, "free-fresh": await store.create_key("acct-free-fresh", "free")}
    finally:
        await redis.aclose()


async def _send(client: httpx.AsyncClient, url: str, key: str, count: int, body: Any = BODY) -> list[int]:
    headers = {"Authorization": f"Bearer {key}"}
    answers = await asyncio.gather(*(client.post(url + PATH, json=body, headers=headers) for _ in range(count)))
    return [answer.status_code for answer in answers]


async def _charged(client: httpx.AsyncClient, url: str, plan: str) -> float:
    """`quotagate_images_charged_total` of `plan`, from the gateway's own /metrics (all workers summed)."""
    families = text_string_to_metric_families((await client.get(url + "/metrics")).text)
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "quotagate_images_charged_total" and sample.labels == {"plan": plan}
    )


async def _until_shed(client: httpx.AsyncClient, url: str, key: str) -> list[int]:
    """Free requests, one after another, until one is shed (503).

    Each asks for more images than the plan's day allows: shedding comes before the decision, and
    one that is not shed is refused (400) without a charge or a place in the pool. (An exhausted
    account would not do: it is refused with 429 before the shedding check.)
    """
    statuses: list[int] = []
    deadline = time.monotonic() + DATA_TIMEOUT
    while 503 not in statuses and time.monotonic() < deadline:
        statuses += await _send(client, url, key, 1, {**BODY, "n": 4})
        await asyncio.sleep(0.02)
    return statuses


async def test_every_dashboard_query_and_alert_works_on_a_real_prometheus(
    tmp_path: Path, quotas: Path, redis_url: str, prometheus_binary: str
) -> None:
    services = ServiceSet(tmp_path)
    try:
        await _run(services, quotas, redis_url, prometheus_binary)
    finally:
        services.stop()


async def _run(services: ServiceSet, quotas: Path, redis_url: str, prometheus_binary: str) -> None:
    backend = services.backend(
        Path("tiny"), "--data-dir", str(services.tmp / "backend"),
        "--max-batch-images", "1", "--max-queue", "1", "--max-n", "1", "--max-wait-ms", "0",
    )  # fmt: skip
    env = {"QUOTAGATE_CONFIG_POLL": "0.2"}
    gateway = services.gateway("gateway", quotas, redis_url, backend.url, env, "--workers", "2")
    # A second gateway whose Redis is gone: what it is asked fails where it reaches Redis.
    orphan_config = services.tmp / "orphan.yaml"
    orphan_config.write_text(QUOTAS)
    orphan = services.gateway("orphan", orphan_config, f"redis://127.0.0.1:{free_port()}/0", backend.url)
    server, prometheus = _start_prometheus(services, prometheus_binary, [gateway, orphan], backend)
    for service in (gateway, orphan):
        service.wait_ready()
    server.wait_ready("/-/ready")
    backend.wait_ready("/readyz", timeout=120)
    keys = await _keys(redis_url)

    # A new connection per request, so both workers of the gateway get some.
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        # Ordinary traffic: images for both plans, then the free plan's daily quota runs out.
        assert await _send(client, gateway.url, keys["pro"], 1) == [200]
        assert await _send(client, gateway.url, keys["free"], 1) == [200]
        # One at a time: a free request may hold only one place per worker, so a second at once is shed.
        assert await _send(client, gateway.url, keys["free"], 1) == [200]
        assert await _send(client, gateway.url, keys["free"], 1) == [429]
        seen = 'quotagate_requests_total{outcome=~"allowed|quota_exhausted"}'
        prometheus.wait_for("the ordinary traffic", lambda: [] if _total(prometheus, seen) == 4 else [seen])
        # rate() needs a sample from before the refusals: a backend first scraped after them shows a
        # counter that never rose, and its alert could never hold.
        refused = 'quotagate_backend_rejections_total{reason="queue_full"}'
        prometheus.wait_for("the backend's refusals at zero", lambda: [] if prometheus.query(refused) else [refused])
        for rule in alert_rules():
            assert prometheus.query(rule["expr"]) == [], f"{rule['alert']} holds before anything went wrong"

        # Now each alert's condition, for real. Four slow pro images at once: the backend runs one, queues
        # one and refuses two (queue_full); while they hold their places, free requests are shed.
        charged, deadline = await _charged(client, gateway.url, "pro"), time.monotonic() + DATA_TIMEOUT
        slow = asyncio.ensure_future(_send(client, gateway.url, keys["pro"], 4, SLOW))
        # Free requests only once all four are admitted: a free request being decided holds a place
        # too, and could leave the fourth no room (pro is sure of 3 of each worker's 4 places).
        while await _charged(client, gateway.url, "pro") < charged + 4:
            assert time.monotonic() < deadline, "the slow pro requests were never admitted"
            await asyncio.sleep(0.02)
        assert 503 in await _until_shed(client, gateway.url, keys["free-fresh"])
        assert sorted(await slow) == [200, 200, 503, 503]
        # The two 503s are the backend's own refusals (its queue was full), not the gateway's shedding.
        assert backend.metric("quotagate_backend_rejections_total", reason="queue_full") == 2
        assert await _send(client, orphan.url, keys["pro"], 3) == [503, 503, 503]
    await asyncio.to_thread(quotas.write_text, "plans: [this is not a quota file\n")

    rules = [rule for rule in alert_rules() if rule["alert"] not in PROVED_ELSEWHERE]
    prometheus.wait_for(
        "every alert's condition", lambda: [rule["alert"] for rule in rules if not prometheus.query(rule["expr"])]
    )
    prometheus.wait_for(
        "every alert pending or firing", lambda: sorted({rule["alert"] for rule in rules} - set(prometheus.alerts()))
    )
    assert set(prometheus.alerts().values()) <= {"pending", "firing"}

    empty = [expr for expr in dashboard_queries() if not prometheus.query(expr)]
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)


def _total(prometheus: Prometheus, selector: str) -> float:
    return sum(float(sample["value"][1]) for sample in prometheus.query(f"sum({selector})"))
