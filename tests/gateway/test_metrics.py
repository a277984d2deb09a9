"""The metrics catalogue: every series exists before traffic, and failures are counted where they happen."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config.quotas import Config
from gateway.observe.metrics import OUTCOMES, REDIS_OPERATIONS, RELOAD_RESULTS, GatewayMetrics
from tests.ports import free_port
from tests.support.settings import settings_for
from tests.support.upstream import StubUpstream

PATH = "/v1/images/generations"
A_WELL_FORMED_KEY = "qg_" + "0" * 16 + "_" + "1" * 48


def test_every_series_of_the_catalogue_is_exported_at_zero(config: Config) -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.declare(config.plans, config.routes, ["diffusion"])
    value = registry.get_sample_value
    for plan in config.plans:
        for outcome in OUTCOMES:
            assert value("quotagate_requests_total", {"plan": plan, "route": PATH, "outcome": outcome}) == 0
        assert value("quotagate_in_flight_requests", {"plan": plan}) == 0
        assert value("quotagate_store_failure_requests_total", {"plan": plan, "action": "allowed"}) == 0
    for operation in REDIS_OPERATIONS:
        assert value("quotagate_redis_errors_total", {"operation": operation}) == 0
    for result in RELOAD_RESULTS:
        assert value("quotagate_config_reloads_total", {"result": result}) == 0
    assert value("quotagate_upstream_in_flight_requests", {"pool": "diffusion"}) == 0
    assert value("quotagate_store_circuit_open") == 0


def test_the_loaded_config_version_is_1_and_the_one_before_0() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.loaded_config("aaa")
    metrics.loaded_config("bbb")
    assert registry.get_sample_value("quotagate_config_version_info", {"version": "aaa"}) == 0
    assert registry.get_sample_value("quotagate_config_version_info", {"version": "bbb"}) == 1


def test_the_app_exports_its_config_version(redis_url: str, upstream: StubUpstream, config: Config) -> None:
    app = create_app(settings_for(redis_url, upstream.url), config)
    with TestClient(app) as client:
        text = client.get("/metrics").text
    assert f'quotagate_config_version_info{{version="{config.version}"}} 1.0' in text


@pytest.mark.parametrize("path", ["/readyz", PATH])
def test_an_unreachable_redis_is_counted_as_redis_errors(upstream: StubUpstream, config: Config, path: str) -> None:
    registry = CollectorRegistry()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(settings_for(dead_redis, upstream.url), config, registry=registry)
    with TestClient(app) as client:
        answer = (
            client.post(PATH, json={"prompt": "x"}, headers={"Authorization": f"Bearer {A_WELL_FORMED_KEY}"})
            if path == PATH
            else client.get(path)
        )
    assert answer.status_code == 503
    operation = "authenticate" if path == PATH else "readyz"
    assert registry.get_sample_value("quotagate_redis_errors_total", {"operation": operation}) == 1
    if path == PATH:
        labels = {"plan": "none", "route": PATH, "outcome": "store_unavailable"}
        assert registry.get_sample_value("quotagate_requests_total", labels) == 1
