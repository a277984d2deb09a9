"""`GET /v1/quota`: an account's own plan, and where each of its limits stands; charges nothing."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.caller import identify
from gateway.errors import Forbidden, ServiceUnavailable
from gateway.headers import rate_limit_headers
from limits import Bucket, DailyQuota, LimitsError

if TYPE_CHECKING:
    from gateway.app import Services


async def quota(request: Request) -> Response:
    """The caller's plan and, per limit, its size, what is used and left, and when it resets."""
    services: Services = request.app.state.services
    identity = await identify(request, services)
    plan = services.config.plan_at(identity.plan, time.time())
    if plan is None:
        raise Forbidden(f"This account's plan {identity.plan!r} is not offered; contact support.")
    try:
        decision, used = await services.engine.usage(identity.account, plan.limits)
    except LimitsError as exc:
        raise ServiceUnavailable(
            "The quota service is unavailable; retry shortly.", headers={"Retry-After": "1"}
        ) from exc
    now = decision.now_us / 1_000_000  # Redis's clock, as the limits themselves see it
    limits: list[dict[str, Any]] = []
    for state in decision.states:
        limit = state.limit
        if isinstance(limit, Bucket):
            entry = {"name": limit.name, "kind": "rate", "images": limit.rate, "per_seconds": limit.period}
            entry |= {
                "burst": limit.burst,
                "remaining": state.remaining,
                "full_in_seconds": round(state.reset_after, 3),
            }
        else:
            assert isinstance(limit, DailyQuota)
            entry = {"name": limit.name, "kind": "daily", "limit": limit.limit, "used": used[limit.name]}
            entry |= {"remaining": state.remaining, "timezone": limit.timezone.key}
            entry |= {"resets_at": _instant(now + state.reset_after), "resets_in_seconds": round(state.reset_after, 3)}
        if limit.shadow:
            entry["shadow"] = True  # counted, never enforced
        limits.append(entry)
    body = {"object": "quota", "account": identity.account, "plan": plan.name, "limits": limits}
    return JSONResponse(body, headers=rate_limit_headers(plan.limits, decision))


def _instant(seconds: float) -> str:
    return datetime.fromtimestamp(round(seconds), UTC).isoformat().replace("+00:00", "Z")
