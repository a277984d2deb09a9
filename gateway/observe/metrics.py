"""The gateway's Prometheus metrics: the whole catalogue, registered on a registry passed in (one per app).

Labels come from config names only (plan, route path, upstream pool, outcome, result), never from
keys or accounts. With several uvicorn workers, `PROMETHEUS_MULTIPROC_DIR` names a directory the
workers write their values to (`quotagate serve` creates and cleans it), and `render` adds them up,
so a scrape sees the gateway's totals whichever worker answers it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# What became of a request: one label value per way it can end.
OUTCOMES = (
    "allowed",
    "rate_limited",
    "quota_exhausted",
    "shed",
    "unauthorized",
    "bad_request",
    "store_unavailable",
    "upstream_error",
    "refunded",
    "replayed",
    "idempotency_refused",
    "client_gone",
    "body_timeout",
    "concurrency_limited",
    "queued",
)
# Why a charge was given back (gateway/http/relay.py states the charging rule).
REFUND_REASONS = ("upstream_error", "refused", "withdrawn")
# Requests refused before their plan is known are counted under this plan label.
NO_PLAN = "none"
NO_PLAN_OUTCOMES = ("unauthorized", "store_unavailable", "shed", "bad_request")
# How an async job stands or ended (gateway/admission/jobs.py).
JOB_STATUSES = ("queued", "done", "failed", "cancelled")
ETA_ERROR_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 5.0)
# What a plan's shadow limits would have decided for a request its enforced limits admitted.
SHADOW_OUTCOMES = ("allowed", "rate_limited", "quota_exhausted")
# Where a Redis call failed.
REDIS_OPERATIONS = ("authenticate", "decide", "refund", "keep_answer", "readyz", "reload", "brownout")
RELOAD_RESULTS = ("success", "failure")
# What `on_store_failure` did with a request while Redis could not decide it.
STORE_FAILURE_ACTIONS = ("allowed", "denied")

Metric = TypeVar("Metric", Counter, Gauge, Histogram)


class Labelled(Generic[Metric]):
    """A labelled metric whose children are looked up once per label values.

    prometheus_client's `labels()` checks its arguments and takes a lock on every call (~1.7 µs);
    a request makes about eight such lookups. Children are never removed here, so caching them is safe.
    """

    def __init__(self, metric: Metric) -> None:
        self.metric: Metric = metric
        self._children: dict[tuple[str, ...], Metric] = {}

    def labels(self, *values: str) -> Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
UPSTREAM_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """Every counter, gauge and histogram of the gateway.

    Gauges name how workers' values combine (`multiprocess_mode`); it only matters in multiprocess mode.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Labelled(
            Counter(
                "quotagate_requests",
                "Requests by plan, route and outcome.",
                ["plan", "route", "outcome"],
                registry=registry,
            )
        )
        self.images_charged = Labelled(
            Counter("quotagate_images_charged", "Images charged at admission, by plan.", ["plan"], registry=registry)
        )
        self.images_refunded = Labelled(
            Counter(
                "quotagate_images_refunded",
                "Images refunded, by plan and reason: upstream_error (the backend or the path to it failed), "
                "refused (the backend took no work: its 4xx or 503), withdrawn (the client left before it began).",
                ["plan", "reason"],
                registry=registry,
            )
        )
        self.decision_seconds = Histogram(
            "quotagate_decision_seconds",
            "Time to decide a request against Redis.",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.upstream_seconds = Labelled(
            Histogram(
                "quotagate_upstream_seconds",
                "Time the upstream took to answer, by route.",
                ["route"],
                registry=registry,
                buckets=UPSTREAM_BUCKETS,
            )
        )
        self.in_flight = Labelled(
            Gauge(
                "quotagate_in_flight_requests",
                "Requests admitted and not yet answered, by plan.",
                ["plan"],
                registry=registry,
                multiprocess_mode="livesum",
            )
        )
        self.redis_errors = Labelled(
            Counter(
                "quotagate_redis_errors",
                "Redis calls that failed (connection, timeout, refused script), by operation.",
                ["operation"],
                registry=registry,
            )
        )
        self.store_failures = Labelled(
            Counter(
                "quotagate_store_failure_requests",
                "Requests decided by on_store_failure while Redis was unavailable, by plan and action.",
                ["plan", "action"],
                registry=registry,
            )
        )
        self.store_circuit_open = Gauge(
            "quotagate_store_circuit_open",
            "1 while the Redis circuit breaker is open (in any worker), else 0.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.shadow_requests = Labelled(
            Counter(
                "quotagate_shadow_requests",
                "What shadow limits would have decided for admitted requests, by plan, route and outcome; "
                "not enforced.",
                ["plan", "route", "outcome"],
                registry=registry,
            )
        )
        self.config_reloads = Labelled(
            Counter(
                "quotagate_config_reloads",
                "Config reloads by result (success, failure).",
                ["result"],
                registry=registry,
            )
        )
        self.config_version = Labelled(
            Gauge(
                "quotagate_config_version_info",
                "1 for the version (hash) of the loaded quota config; 0 for versions loaded before.",
                ["version"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        self.upstream_in_flight = Labelled(
            Gauge(
                "quotagate_upstream_in_flight_requests",
                "Requests being forwarded, by upstream pool.",
                ["pool"],
                registry=registry,
                multiprocess_mode="livesum",
            )
        )
        self.upstream_healthy = Labelled(
            Gauge(
                "quotagate_upstream_healthy_backends",
                "Backends of a pool that pass health checks (the lowest any worker sees).",
                ["pool"],
                registry=registry,
                multiprocess_mode="livemin",
            )
        )
        self.jobs = Labelled(
            Counter(
                "quotagate_jobs",
                "Async jobs by plan and status: queued (accepted with 202), then done, failed or cancelled.",
                ["plan", "status"],
                registry=registry,
            )
        )
        self.eta_error = Histogram(
            "quotagate_line_eta_error_ratio",
            "For each async job as it starts: |time it waited - the wait it was told| / the wait it was told.",
            registry=registry,
            buckets=ETA_ERROR_BUCKETS,
        )
        # The fleet's pools as Redis holds them: every worker reads the same values, so workers combine by max.
        self.fleet_capacity = Labelled(
            Gauge(
                "quotagate_fleet_capacity_images",
                "Images the pool's live backends advertise they can hold (within max_in_flight), fleet-wide.",
                ["pool"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        self.fleet_drain = Labelled(
            Gauge(
                "quotagate_fleet_drain_images_per_second",
                "Images per second the pool's live backends measure they finish, fleet-wide.",
                ["pool"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        self.fleet_backends = Labelled(
            Gauge(
                "quotagate_fleet_live_backends",
                "Backends of the pool whose advertised capacity is live.",
                ["pool"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        self.fleet_held = Labelled(
            Gauge(
                "quotagate_fleet_held_images",
                "Images in flight to the pool, fleet-wide, by plan.",
                ["pool", "plan"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        self.line_length = Labelled(
            Gauge(
                "quotagate_line_length",
                "Tickets waiting in the pool's line, by plan.",
                ["pool", "plan"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        self.line_wait = Labelled(
            Gauge(
                "quotagate_line_wait_seconds",
                "Seconds a request joining the plan's line now would wait for its turn (0 with no line).",
                ["pool", "plan"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        self.brownout_active = Labelled(
            Gauge(
                "quotagate_brownout_active",
                "1 while the brownout rule applies (its plan's limits lowered until the line shortens), else 0.",
                ["rule"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        self._version: str | None = None

    def declare(self, plans: Iterable[str], routes: Iterable[str], pools: Iterable[str] = ()) -> None:
        """Create every series at zero (but the fleet's), so rates, dashboards and alerts see them before traffic."""
        plans, routes = list(plans), list(routes)
        for plan in plans:
            self.images_charged.labels(plan)
            for reason in REFUND_REASONS:
                self.images_refunded.labels(plan, reason)
            self.in_flight.labels(plan)
            for status in JOB_STATUSES:
                self.jobs.labels(plan, status)
            for action in STORE_FAILURE_ACTIONS:
                self.store_failures.labels(plan, action)
            for route in routes:
                for outcome in OUTCOMES:
                    self.requests.labels(plan, route, outcome)
                for outcome in SHADOW_OUTCOMES:
                    self.shadow_requests.labels(plan, route, outcome)
        for route in routes:
            self.upstream_seconds.labels(route)
            for outcome in NO_PLAN_OUTCOMES:
                self.requests.labels(NO_PLAN, route, outcome)
        for operation in REDIS_OPERATIONS:
            self.redis_errors.labels(operation)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        # Not the fleet's gauges: they appear at the first reading of Redis (gateway/admission/poolwatch.py), NaN
        # if it fails, so a gateway that cannot read Redis never reports a pool with no capacity.
        for pool in pools:
            self.upstream_in_flight.labels(pool)
        self.store_circuit_open.set(0)

    def loaded_config(self, version: str) -> None:
        """Mark `version` as the config now in force (and the one before as no longer)."""
        if self._version is not None and self._version != version:
            self.config_version.labels(self._version).set(0)
        self.config_version.labels(version).set(1)
        self._version = version


def multiprocess_dir() -> str | None:
    """The directory workers share their values through, or None in a single process."""
    return os.environ.get(MULTIPROC_ENV) or None


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text for a scrape: `registry`'s values, or every worker's added up."""
    if multiprocess_dir() is None:
        return generate_latest(registry)
    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
    return generate_latest(combined)


def worker_exited() -> None:
    """Drop this worker's live gauges (in flight, circuit, version) from the shared values."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


@contextmanager
def shared_across_workers(workers: int) -> Iterator[None]:
    """Give `workers` uvicorn workers one metrics directory, emptied first (a stale one would add old counts).

    An operator's `PROMETHEUS_MULTIPROC_DIR` is used and kept; else several workers get a temporary one.
    """
    chosen = multiprocess_dir()
    if chosen is not None:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        for stale in Path(chosen).glob("*.db"):
            stale.unlink()
        yield
        return
    if workers < 2:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="quotagate-metrics-") as made:
        os.environ[MULTIPROC_ENV] = made
        try:
            yield
        finally:
            del os.environ[MULTIPROC_ENV]
