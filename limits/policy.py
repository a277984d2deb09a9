"""The limits a plan applies to each request: frozen values, built once per config load."""

from __future__ import annotations

from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

PERIODS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
# The scripts count time in whole microseconds, so a bucket refills at most one unit per microsecond.
MAX_RATE_PER_S = 1_000_000


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: `rate` units per `period` seconds sustained, up to `burst` at once.

    `shadow`: computed and reported, never refuses (a limit tried out before it is enforced).
    """

    name: str
    counter: str
    rate: int
    period: int
    burst: int
    shadow: bool = False

    def __post_init__(self) -> None:
        if self.rate < 1 or self.period < 1 or self.burst < 1:
            raise ValueError(f"bucket {self.name!r}: rate, period and burst must be at least 1")
        if self.rate > self.period * MAX_RATE_PER_S:
            raise ValueError(f"bucket {self.name!r}: at most {MAX_RATE_PER_S:,} units per second")

    @property
    def interval_us(self) -> int:
        """Microseconds the bucket takes to refill one unit."""
        return round(self.period * 1_000_000 / self.rate)


@dataclass(frozen=True, slots=True)
class DailyQuota:
    """Units per calendar day in `timezone`; `limit=None` counts usage and never refuses; `shadow` as for Bucket."""

    name: str
    counter: str
    limit: int | None
    timezone: ZoneInfo
    shadow: bool = False

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"quota {self.name!r}: limit must be 0 or more, or None for unlimited")


Limit = Bucket | DailyQuota


@dataclass(frozen=True, slots=True)
class LimitSet:
    """Every limit one request is charged against, buckets first (the order the scripts expect).

    `name` identifies the set in errors and logs; `counter` names a limit's Redis key, so a plan
    change or a temporary override that keeps the counter keeps the usage counted so far.
    """

    buckets: tuple[Bucket, ...] = ()
    quotas: tuple[DailyQuota, ...] = ()
    bucket_args: tuple[int, ...] = field(init=False, repr=False, compare=False)
    shadow_arg: str = field(init=False, repr=False, compare=False)  # '1' per shadow limit, in order; '' if none
    _hash: int = field(init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        # Hashed once: the gateway looks up per-LimitSet values (its RateLimit-Policy) on every request.
        return self._hash

    def __post_init__(self) -> None:
        counters = [limit.counter for limit in self]
        if len(set(counters)) != len(counters):
            raise ValueError(f"two limits share a counter: {counters}")
        args = tuple(n for b in self.buckets for n in (b.interval_us, b.burst))
        object.__setattr__(self, "bucket_args", args)
        shadow = "".join("1" if limit.shadow else "0" for limit in self)
        object.__setattr__(self, "shadow_arg", shadow if "1" in shadow else "")
        object.__setattr__(self, "_hash", hash((self.buckets, self.quotas)))

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from self.buckets
        yield from self.quotas

    def __len__(self) -> int:
        return len(self.buckets) + len(self.quotas)
