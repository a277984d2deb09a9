"""What the request path uses, built once per process by the app factory (gateway/app.py)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.admission.brownout import Brownouts
from gateway.admission.caller import Caller
from gateway.admission.concurrency import Leases
from gateway.admission.jobs import JobStore
from gateway.admission.places import PoolPlaces
from gateway.admission.refusals import Refusals
from gateway.admission.storefailure import StoreGuard
from gateway.config.quotas import Config
from gateway.config.reload import LiveConfig
from gateway.config.settings import Settings
from gateway.observe.metrics import GatewayMetrics
from gateway.upstream.capacity import CapacityWatcher
from gateway.upstream.forward import Forwarder


@dataclass(slots=True)
class Services:
    """The request path's collaborators: who is calling, may it pass, where it goes, what is counted."""

    settings: Settings
    live_config: LiveConfig
    caller: Caller
    store: StoreGuard
    refusals: Refusals
    places: PoolPlaces
    jobs: JobStore
    brownouts: Brownouts  # the brownout rules that apply now, fleet-wide
    capacity: CapacityWatcher  # what each backend can hold; told of every request for those that do not say
    leases: Leases
    forwarder: Forwarder
    metrics: GatewayMetrics

    @property
    def config(self) -> Config:
        """The config in force now: read it once per request, so the request keeps it to its end."""
        return self.live_config.current
