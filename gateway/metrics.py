"""The gateway's Prometheus metrics, registered on a registry passed in (one per app).

Labels come from config names only (plan, route path, outcome), never from keys or accounts.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

# What became of a request: one label value per way it can end.
OUTCOMES = (
    "allowed",
    "rate_limited",
    "quota_exhausted",
    "unauthorized",
    "bad_request",
    "store_unavailable",
    "upstream_error",
    "refunded",
)


class GatewayMetrics:
    """Counters and histograms of the request path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "quotagate_requests",
            "Requests by plan, route and outcome.",
            ["plan", "route", "outcome"],
            registry=registry,
        )
        self.images_charged = Counter(
            "quotagate_images_charged", "Images charged at admission, by plan.", ["plan"], registry=registry
        )
        self.images_refunded = Counter(
            "quotagate_images_refunded",
            "Images refunded after a failed upstream answer, by plan.",
            ["plan"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "quotagate_decision_seconds",
            "Time to decide a request against Redis.",
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.upstream_seconds = Histogram(
            "quotagate_upstream_seconds",
            "Time the upstream took to answer, by route.",
            ["route"],
            registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )

    def declare(self, plans: Iterable[str], routes: Iterable[str]) -> None:
        """Create every plan × route × outcome series at zero, so rates and alerts see them before traffic."""
        routes = list(routes)
        for plan in plans:
            self.images_charged.labels(plan)
            self.images_refunded.labels(plan)
            for route in routes:
                for outcome in OUTCOMES:
                    self.requests.labels(plan, route, outcome)
