"""`GET /v1/quota`: an account's own plan, and where each of its limits stands; charges nothing."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.admission.ratelimit_headers import rate_limit_headers
from gateway.admission.usage import limits_view
from gateway.errors import Forbidden
from gateway.http.request_headers import header_fields
from gateway.http.services import Services


async def quota(request: Request) -> Response:
    """The caller's plan and, per limit, its size, what is used and left, and when it resets."""
    services: Services = request.app.state.services
    headers = header_fields(request.scope["headers"])  # as the proxied routes read them
    identity = await services.caller.identify(headers, request.client.host if request.client else None)
    plan = services.config.plan_at(identity.plan, time.time(), services.brownouts.applied())
    if plan is None:
        raise Forbidden(f"This account's plan {identity.plan!r} is not offered; contact support.")
    decision, used = await services.store.usage(identity.account, plan)
    body = {"object": "quota", "account": identity.account, "plan": plan.name, "limits": limits_view(decision, used)}
    return JSONResponse(body, headers=rate_limit_headers(plan.limits, decision))
