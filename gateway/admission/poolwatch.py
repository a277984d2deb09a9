"""The pools as the whole fleet sees them, read from Redis every second: for the metrics and the brownout rules.

Every worker of every replica reads the same values, so the gauges agree wherever a scrape lands. While a
process cannot read them its gauges say NaN (unknown), never a stale or a made-up value: the highest any
gateway reports is then the fleet's, which is how the dashboard and the alerts combine them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

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
        self._failing = False

    async def read_once(self) -> None:
        """Read every routed pool's state into the gauges and the waits; raises if Redis cannot be read."""
        config = self._live_config.current
        waits: dict[str, float] = {}
        m = self._metrics
        for pool in config.routed_pools:
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

    async def refresh(self) -> None:
        """One reading; if it fails, every wait and gauge is unknown until one succeeds (logged once per outage)."""
        try:
            await self.read_once()
        except Exception as exc:
            self._waits = {}
            self._unknown()
            if not self._failing:
                self._failing = True
                log.warning("could not read the pools' state (their gauges say NaN until it can): %s", exc)
            return
        if self._failing:
            self._failing = False
            log.info("the pools' state can be read again")

    async def run(self, stop: asyncio.Event, *, every: float = 1.0) -> None:
        while not stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    def _unknown(self) -> None:
        config = self._live_config.current
        m = self._metrics
        for pool in config.routed_pools:
            for gauge in (m.fleet_capacity, m.fleet_drain, m.fleet_backends):
                gauge.labels(pool).set(math.nan)
            for plan in config.plans:
                for by_plan in (m.fleet_held, m.line_length, m.line_wait):
                    by_plan.labels(pool, plan).set(math.nan)
