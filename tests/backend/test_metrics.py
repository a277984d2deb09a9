"""The backend's metrics exist before the first event, so a rate() over them sees the first one."""

from prometheus_client import CollectorRegistry

from backend.metrics import REJECTION_REASONS, BackendMetrics


def test_every_rejection_reason_is_exported_at_zero() -> None:
    registry = CollectorRegistry()
    BackendMetrics(registry)
    for reason in REJECTION_REASONS:
        assert registry.get_sample_value("quotagate_backend_rejections_total", {"reason": reason}) == 0
