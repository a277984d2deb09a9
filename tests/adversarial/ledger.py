"""What the gateway charged and refunded for a plan, and what the backend made, read from their /metrics.

The backend is read first: an image it made was charged before it was begun, and a charge it made
images for is never refunded as refused or withdrawn, so the bound `made <= charged + refunded for
failures` holds between the two reads even while requests are in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Refunds of images the backend may have made: it, or the path to it, failed (gateway/http/relay.py's rule).
FAILURE = "upstream_error"
# Seconds to wait at most for the gateway to end the requests a client left: a guard, never a measure.
SETTLE_LIMIT = 60.0


@dataclass(frozen=True)
class Ledger:
    """Counters of one plan at one moment, or their change between two moments."""

    charged: float
    refunded: dict[str, float] = field(default_factory=dict)  # by reason
    made: float = 0.0  # images the backend generated, for every plan
    ended: float = 0.0  # requests of the plan the gateway has finished, whatever their outcome
    in_flight: float = 0.0

    @property
    def kept(self) -> float:
        """Images charged and not given back: what the accounts paid for."""
        return self.charged - sum(self.refunded.values())

    @property
    def made_bound(self) -> float:
        """The most images the backend may have made: those paid for, and those refunded because it failed."""
        return self.kept + self.refunded.get(FAILURE, 0.0)

    def since(self, start: Ledger) -> Ledger:
        reasons = self.refunded.keys() | start.refunded.keys()
        return Ledger(
            charged=self.charged - start.charged,
            refunded={r: self.refunded.get(r, 0.0) - start.refunded.get(r, 0.0) for r in reasons},
            made=self.made - start.made,
            ended=self.ended - start.ended,
            in_flight=self.in_flight,
        )


def read_ledger(gateway_url: str, backend_url: str, plan: str) -> Ledger:
    """The counters now: the backend's first (see the module's docstring), then the gateway's."""
    backend = _samples(backend_url)
    gateway = _samples(gateway_url)
    refunded: dict[str, float] = {}
    for name, labels, value in gateway:
        if name == "quotagate_images_refunded_total" and labels.get("plan") == plan:
            reason = labels.get("reason", "unlabelled")
            refunded[reason] = refunded.get(reason, 0.0) + value
    return Ledger(
        charged=_sum(gateway, "quotagate_images_charged_total", plan=plan),
        refunded=refunded,
        made=_sum(backend, "quotagate_backend_images_generated_total"),
        ended=_sum(gateway, "quotagate_requests_total", plan=plan),
        in_flight=_sum(gateway, "quotagate_in_flight_requests", plan=plan),
    )


def settled(gateway_url: str, backend_url: str, plan: str, start: Ledger, requests: int) -> Ledger:
    """The change since `start` once the gateway has ended `requests` requests of the plan and holds none.

    A request the client left is ended by the gateway in its own time (a hang-up during generation
    waits for the backend's answer): polled, within SETTLE_LIMIT.
    """
    deadline = time.monotonic() + SETTLE_LIMIT
    while True:
        change = read_ledger(gateway_url, backend_url, plan).since(start)
        if change.ended >= requests and change.in_flight == 0:
            return change
        assert time.monotonic() < deadline, f"the gateway did not end {requests} requests: {change}"
        time.sleep(0.02)


def _samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(value for sample, got, value in samples if sample == name and labels.items() <= got.items())
