"""An account's limits as JSON, one shape wherever it is shown: `GET /v1/quota` (the account's own),
the admin API's usage and `quotagate usage` (an operator's)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from limits import Bucket, DailyQuota, Decision


def limits_view(decision: Decision, used: dict[str, int]) -> list[dict[str, Any]]:
    """Per limit: its size, what is used (daily quotas) and left, and when it is full again or resets."""
    now = decision.now_us / 1_000_000  # Redis's clock, as the limits themselves see it
    out: list[dict[str, Any]] = []
    for state in decision.states:
        limit = state.limit
        if isinstance(limit, Bucket):
            entry = {"name": limit.name, "kind": "rate", "burst": limit.burst, "rate": limit.rate, "per": limit.period}
            entry |= {"remaining": state.remaining, "full_in_s": round(state.reset_after, 3)}
        else:
            assert isinstance(limit, DailyQuota)
            entry = {"name": limit.name, "kind": "daily", "limit": limit.limit, "timezone": limit.timezone.key}
            entry |= {"used": used.get(limit.name, 0), "remaining": state.remaining}
            entry |= {"resets_in_s": round(state.reset_after, 3), "resets_at": _instant(now + state.reset_after)}
        if limit.shadow:
            entry["shadow"] = True  # counted, never enforced
        out.append(entry)
    return out


def _instant(seconds: float) -> str:
    return datetime.fromtimestamp(round(seconds), UTC).isoformat().replace("+00:00", "Z")
