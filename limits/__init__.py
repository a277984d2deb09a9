"""quotagate's quota and rate engine: token buckets and calendar-day quotas, decided atomically in Redis.

It knows nothing of HTTP: callers pass an account, the limits that apply and a cost.
"""

from limits.decision import Decision, KeyState, LimitState
from limits.engine import Engine
from limits.errors import ClockSkew, LimitsError, StoreUnavailable
from limits.fleet import Admitted, Claimed, Fleet, LinePlan, Place, PoolRules, PoolState, Queued, Turned
from limits.idempotency import KeyLifetimes
from limits.lease import Lease
from limits.nearcache import INVALIDATIONS, DenialCache, follow_invalidations
from limits.policy import MAX_RATE_PER_S, PERIODS, Bucket, DailyQuota, Limit, LimitSet
from limits.store import RedisClient, connect

__all__ = [
    "MAX_RATE_PER_S",
    "Admitted",
    "Claimed",
    "Fleet",
    "LinePlan",
    "Place",
    "PoolRules",
    "PoolState",
    "Queued",
    "Turned",
    "PERIODS",
    "Bucket",
    "INVALIDATIONS",
    "ClockSkew",
    "DailyQuota",
    "DenialCache",
    "Decision",
    "Engine",
    "KeyLifetimes",
    "KeyState",
    "Lease",
    "Limit",
    "LimitSet",
    "LimitState",
    "LimitsError",
    "RedisClient",
    "StoreUnavailable",
    "connect",
    "follow_invalidations",
]
