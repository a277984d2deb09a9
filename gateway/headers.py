"""The rate-limit fields every answer carries, from a decision.

IETF draft-ietf-httpapi-ratelimit-headers (draft 08 and later): `RateLimit-Policy` lists each
limit's quota `q` and window `w` (seconds); `RateLimit` gives what `r` remains and in how many
seconds `t` it resets. Unlimited quotas are not limits, so they are left out of both.
"""

from __future__ import annotations

import math
from functools import lru_cache

from limits import Bucket, Decision, LimitSet


def rate_limit_headers(limits: LimitSet, decision: Decision) -> dict[str, str]:
    """`RateLimit-Policy` and `RateLimit` for one decision (empty when nothing limits the plan)."""
    current = ", ".join(
        f'"{s.limit.name}";r={s.remaining};t={math.ceil(s.reset_after)}'
        for s in decision.states
        if s.remaining is not None
    )
    policy = _policy(limits)
    return {"RateLimit-Policy": policy, "RateLimit": current} if policy else {}


def retry_after(decision: Decision) -> dict[str, str]:
    """`Retry-After` in whole seconds, never earlier than the limit that refused resets."""
    wait = decision.retry_after
    return {} if wait is None else {"Retry-After": str(max(1, math.ceil(wait)))}


@lru_cache(maxsize=64)
def _policy(limits: LimitSet) -> str:
    entries = []
    for limit in limits:
        if isinstance(limit, Bucket):
            entries.append(f'"{limit.name}";q={limit.burst};w={math.ceil(limit.burst * limit.interval_us / 1e6)}')
        elif limit.limit is not None:
            entries.append(f'"{limit.name}";q={limit.limit};w=86400')
    return ", ".join(entries)
