"""Prometheus metrics of the backend, registered on a registry passed in (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BackendMetrics"]

_PREFIX = "quotagate_backend_"
# Why a request was refused; each series exists at zero from start, so rate() sees the first refusal.
REJECTION_REASONS = ("queue_full", "queue_wait", "not_ready", "invalid", "too_large")


class BackendMetrics:
    """Queue depth by priority, batch sizes, generation time, drain rate, images made, rejections by reason."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.queue_depth = Gauge(
            _PREFIX + "queue_depth_requests",
            "Requests waiting for the inference worker, by priority.",
            ["priority"],
            registry=registry,
        )
        self.queued_images = Gauge(
            _PREFIX + "queue_depth_images", "Images waiting for the inference worker.", registry=registry
        )
        self.batch_images = Histogram(
            _PREFIX + "batch_images",
            "Images of requests run together in one pipeline call (filler slots excluded).",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=registry,
        )
        self.generation_seconds = Histogram(
            _PREFIX + "generation_seconds",
            "Seconds one pipeline call took, PNG encoding included.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            _PREFIX + "queue_wait_seconds",
            "Seconds a request waited in the queue before its batch started.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30),
            registry=registry,
        )
        self.drain_rate = Gauge(
            _PREFIX + "drain_images_per_second",
            "Measured images finished per second of pipeline time (weighted mean over recent batches; 0 before any).",
            registry=registry,
        )
        self.images_generated = Counter(
            _PREFIX + "images_generated", "Images generated for requests.", registry=registry
        )
        self.rejections = Counter(
            _PREFIX + "rejections",
            "Requests refused, by reason (queue_full, queue_wait, not_ready, invalid, too_large).",
            ["reason"],
            registry=registry,
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        self.cancelled = Counter(
            _PREFIX + "cancelled",
            "Requests whose client went away while queued; they cost no inference.",
            registry=registry,
        )
        self.withdrawn = Counter(
            _PREFIX + "withdrawn",
            "Requests the gateway withdrew while queued (its client left); never started, no image made.",
            registry=registry,
        )
        self.failures = Counter(_PREFIX + "inference_failures", "Pipeline calls that raised.", registry=registry)
