"""The rate-limit fields every answer carries, from a decision.

IETF draft-ietf-httpapi-ratelimit-headers (draft 08 and later): `RateLimit-Policy` lists each
limit's quota `q` and window `w` (seconds); `RateLimit` gives what `r` remains and in how many
seconds `t` it resets. Unlimited quotas and limits in shadow mode refuse nothing, so they are left
out of both, and of OpenAI's fields.

OpenAI's fields, which its clients and dashboards read: `x-ratelimit-{limit,remaining,reset}-requests`
describe the plan's token bucket (OpenAI's short-window limit) and `-images` its daily image quota,
with resets as Go-style durations (`1s`, `6m0s`, `20ms`).
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

from limits import Bucket, DailyQuota, Decision, LimitSet

# A refusal by a daily quota says "come back at midnight" to every refused client at once; each is
# told a moment up to this many seconds later instead, so they do not all return in the same second.
DAILY_RESET_SPREAD_S = 300


def rate_limit_headers(limits: LimitSet, decision: Decision) -> dict[str, str]:
    """The IETF and OpenAI rate-limit fields for one decision (empty when nothing limits the plan)."""
    policy = _policy(limits)
    if not policy:  # every limit is unlimited or in shadow mode: nothing to tell
        return {}
    remaining = []
    bucket = daily = None
    for state in decision.states:
        limit = state.limit
        if limit.shadow or state.remaining is None:
            continue
        remaining.append(f'"{limit.name}";r={state.remaining};t={math.ceil(state.reset_after)}')
        if bucket is None and isinstance(limit, Bucket):
            bucket = state
        elif daily is None and isinstance(limit, DailyQuota):
            daily = state
    headers = {"RateLimit-Policy": policy, "RateLimit": ", ".join(remaining)}
    if bucket is not None and isinstance(bucket.limit, Bucket):
        headers["x-ratelimit-limit-requests"] = str(bucket.limit.burst)
        headers["x-ratelimit-remaining-requests"] = str(bucket.remaining)
        headers["x-ratelimit-reset-requests"] = duration(bucket.reset_after)
    if daily is not None and isinstance(daily.limit, DailyQuota):
        headers["x-ratelimit-limit-images"] = str(daily.limit.limit)
        headers["x-ratelimit-remaining-images"] = str(daily.remaining)
        headers["x-ratelimit-reset-images"] = duration(daily.reset_after)
    return headers


def retry_after(decision: Decision, rng: random.Random | None = None) -> dict[str, str]:
    """`Retry-After` in whole seconds, never earlier than the limit that refused resets.

    At a daily quota's reset it is spread over DAILY_RESET_SPREAD_S seconds past midnight.
    """
    wait = decision.retry_after
    if wait is None:
        return {}
    seconds = max(1, math.ceil(wait))
    denied = decision.denied_by
    if denied is not None and isinstance(denied.limit, DailyQuota):
        seconds += (rng or random).randint(0, DAILY_RESET_SPREAD_S)
    return {"Retry-After": str(seconds)}


def duration(seconds: float) -> str:
    """A Go-style duration as OpenAI writes resets: `20ms`, `1.5s`, `6m0s`, `13h2m5s`; never shorter than `seconds`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


@lru_cache(maxsize=64)
def _policy(limits: LimitSet) -> str:
    entries = []
    for limit in limits:
        if limit.shadow:
            continue
        if isinstance(limit, Bucket):
            entries.append(f'"{limit.name}";q={limit.burst};w={math.ceil(limit.burst * limit.interval_us / 1e6)}')
        elif limit.limit is not None:
            entries.append(f'"{limit.name}";q={limit.limit};w=86400')
    return ", ".join(entries)
