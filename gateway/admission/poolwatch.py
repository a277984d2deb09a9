"""The pools as the whole fleet sees them, read from Redis every second: for the metrics and the brownout rules.

Every worker of every replica reads the same values, so the gauges agree wherever a scrape lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.admission.places import PoolPlaces
from gateway.config.reload import LiveConfig
from gateway.observe.metrics import GatewayMetrics

log = logging.getLogger("quotagate.pools")


class PoolWatch:
    """Reads each routed pool's state; `wait_of(plan)` is the longest wait its lines tell a newcomer now."""

    def __init__(self, places: PoolPlaces, live_config: LiveConfig, metrics: GatewayMetrics) -> None:
        self._places = places
        self._live_config = live_config
        self._metrics = metrics
        self._waits: dict[str, float] = {}

    async def read_once(self) -> None:
        config = self._live_config.current
        waits: dict[str, float] = {}
        m = self._metrics
        for pool in sorted({route.upstream for route in config.routes.values()}):
            state = await self._places.fleet.state(pool, self._places.rules(config, pool))
            m.fleet_capacity.labels(pool).set(state.capacity)
            m.fleet_drain.labels(pool).set(state.images_per_s)
            m.fleet_backends.labels(pool).set(state.backends)
            for plan, standing in state.plans.items():
                m.fleet_held.labels(pool, plan).set(standing.held)
                m.line_length.labels(pool, plan).set(standing.line)
                m.line_wait.labels(pool, plan).set(standing.wait)
                waits[plan] = max(waits.get(plan, 0.0), standing.wait)
        self._waits = waits

    async def wait_of(self, plan: str) -> float | None:
        """Seconds a newcomer to `plan`'s line waits now (the longest over its pools); None before a reading."""
        return self._waits.get(plan)

    async def run(self, stop: asyncio.Event, *, every: float = 1.0) -> None:
        while not stop.is_set():
            try:
                await self.read_once()
            except Exception as exc:  # Redis away: the last values stand, and the next reading replaces them
                self._waits = {}
                log.warning("could not read the pools' state: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
