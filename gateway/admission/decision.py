"""Admission: charge a request's cost against its plan's limits in one engine call, or refuse it."""

from __future__ import annotations

import math

from gateway.admission import idempotency
from gateway.admission.identity import Identity
from gateway.admission.ratelimit_headers import rate_limit_headers, retry_after
from gateway.admission.storefailure import StoreGuard
from gateway.config.quotas import Plan
from gateway.errors import ApiError, BadRequest, QuotaExceeded, RateLimited, ServiceUnavailable
from limits import Bucket, Decision, LimitsError


async def admit(
    store: StoreGuard, identity: Identity, plan: Plan, cost: int, *, key: idempotency.RequestKey | None = None
) -> Decision | None:
    """The admitting decision, or None if Redis could not decide and the plan fails open.

    Raises the ApiError to answer when the request is refused, and idempotency.Replayed when the answer
    kept for its Idempotency-Key is the answer (nothing charged).
    """
    try:
        if key is None:
            decision = await store.decide(identity.account, plan, cost)
        else:
            decision = await store.decide(
                identity.account, plan, cost, idempotency_key=key.key, fingerprint=key.fingerprint
            )
    except LimitsError as exc:  # the clocks of Redis and this replica disagree by over a day
        raise ServiceUnavailable(
            "The quota service is unavailable; retry shortly.", headers={"Retry-After": "1"}
        ) from exc
    if decision is not None and decision.kept_answer is not None:
        raise idempotency.Replayed(decision.kept_answer)
    if decision is not None and not decision.allowed:
        raise idempotency.refusal(decision) or refusal(plan, decision)
    return decision


def refusal(plan: Plan, decision: Decision) -> ApiError:
    """The answer to a refused decision: 429 with Retry-After, or 400 if no wait would help.

    A limit an override or a brownout changed says so, with its reason: the client learns why it was
    refused sooner than the plan promises.
    """
    state = decision.denied_by
    assert state is not None
    headers = {**rate_limit_headers(plan.limits, decision), **retry_after(decision)}
    limit = state.limit
    temporary = plan.temporary
    notice = f" {temporary.notice}" if temporary is not None and limit.name in temporary.limits else ""
    if isinstance(limit, Bucket):
        capacity, unit = limit.burst, "images at once"
    else:
        capacity, unit = limit.limit or 0, "images per day"
    if state.retry_after is None:
        return BadRequest(
            f"This request costs {decision.cost} images; the {plan.name} plan allows at most {capacity} {unit}."
            + notice,
            param="n",
            headers=headers,
        )
    wait = headers.get("Retry-After", "1")
    if isinstance(limit, Bucket):
        return RateLimited(
            f"Rate limit reached for the {plan.name} plan ({limit.rate} images per {limit.period} s, "
            f"bursts of {limit.burst}). Retry in {wait} s." + notice,
            headers=headers,
        )
    return QuotaExceeded(
        f"You have used today's {capacity} images on the {plan.name} plan. "
        f"The quota resets at midnight ({limit.timezone.key}); retry in {wait} s, or upgrade your plan." + notice,
        headers=headers,
    )


async def affordable(store: StoreGuard, identity: Identity, plan: Plan, cost: int) -> None:
    """Raise the refusal a request of `cost` would meet now, charging nothing; pass if Redis cannot say.

    For an async job, which is charged when it starts: what its plan could not pay now is not queued.
    """
    decision = await store.decide(identity.account, plan, 0)
    if decision is None:
        return
    for state in decision.states:
        if state.limit.shadow or state.remaining is None or state.remaining >= cost:
            continue
        wait = max(1, math.ceil(state.reset_after))
        headers = {**rate_limit_headers(plan.limits, decision), "Retry-After": str(wait)}
        if isinstance(state.limit, Bucket):
            raise RateLimited(
                f"Rate limit reached for the {plan.name} plan: {state.remaining} of this request's {cost} images are "
                f"available now. Retry in {wait} s.",
                headers=headers,
            )
        raise QuotaExceeded(
            f"This request costs {cost} images and {state.remaining} are left today on the {plan.name} plan. "
            f"The quota resets at midnight ({state.limit.timezone.key}); retry in {wait} s, or upgrade your plan.",
            headers=headers,
        )
