"""The fleet's gauges: what Redis holds for each routed pool, and NaN (unknown), never stale, while it cannot."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.admission.places import PoolPlaces
from gateway.admission.poolwatch import PoolWatch
from gateway.admission.shedding import Shedder
from gateway.admission.storefailure import CircuitBreaker
from gateway.config.quotas import parse_config
from gateway.config.reload import LiveConfig
from gateway.observe.metrics import GatewayMetrics
from gateway.ops.embedded_redis import RedisServer
from limits import Engine, Fleet, connect
from tests.support.quotas import QUOTAS, quota_file

pytestmark = pytest.mark.anyio

POOL_GAUGES = (
    "quotagate_fleet_capacity_images",
    "quotagate_fleet_drain_images_per_second",
    "quotagate_fleet_live_backends",
)
PLAN_GAUGES = ("quotagate_fleet_held_images", "quotagate_line_length", "quotagate_line_wait_seconds")


async def test_the_gauges_say_what_redis_holds_and_nan_while_it_cannot_be_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = connect(server.url)
    engine = Engine(client)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    config = parse_config(QUOTAS, source="quotas.yaml")
    metrics.declare(config.plans, config.routes, ["diffusion", "spare"])  # as the app does at start
    places = PoolPlaces(Fleet(engine), Shedder(), CircuitBreaker())
    watch = PoolWatch(places, LiveConfig(config, quota_file(tmp_path), metrics), metrics)

    def pool(name: str) -> list[float | None]:
        return [registry.get_sample_value(gauge, {"pool": name}) for gauge in POOL_GAUGES]

    def by_plan(name: str) -> list[float | None]:
        return [registry.get_sample_value(g, {"pool": name, "plan": p}) for g in PLAN_GAUGES for p in ("free", "pro")]

    try:
        await places.fleet.advertise("diffusion", "http://gpu-1.internal:8001", 6, 2.5, 30)
        await places.fleet.advertise("spare", "http://gpu-2.internal:8001", 4, 1.0, 30)  # a pool no route uses
        assert pool("diffusion") == [None, None, None]  # nothing before the first reading: not a made-up 0
        await watch.refresh()
        assert pool("diffusion") == [6, 2.5, 1]
        assert by_plan("diffusion") == [0] * 6
        assert await watch.wait_of("free") == 0
        assert pool("spare") == [None, None, None]  # no line, no gauges

        server.kill()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="quotagate.pools"):
            await watch.refresh()
            await watch.refresh()
        assert all(math.isnan(value) for value in [*pool("diffusion"), *by_plan("diffusion")])  # type: ignore[arg-type]
        assert await watch.wait_of("free") is None
        warnings = [r for r in caplog.records if r.name == "quotagate.pools" and r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once per outage, not once a second

        server.start()  # the same data directory: the advertisement is still there
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="quotagate.pools"):
            await watch.refresh()
        assert pool("diffusion") == [6, 2.5, 1]
        assert "can be read again" in caplog.text
    finally:
        await places.close()
        await engine.aclose()
        await client.aclose()
        server.stop()
