"""A pure-Python reference model of the engine's algorithms, for property tests against the Lua.

Same units as the scripts (integer µs), written from the algorithm's definition rather than from
the Lua: GCRA buckets and calendar-day quotas with grants, charged all or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from limits import Bucket, DailyQuota, LimitSet
from limits.calendar import day_starts


@dataclass
class Answer:
    allowed: bool
    rows: list[tuple[int | None, int, int | None]]  # remaining, reset µs, retry µs (None: never)


@dataclass
class Model:
    limits: LimitSet
    tat: dict[str, int] = field(default_factory=dict)  # bucket counter → theoretical arrival time
    quota: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # counter → (day, used, granted)

    def _day(self, quota: DailyQuota, now: int) -> tuple[int, int]:
        starts = day_starts(quota.timezone, now / 1e6)
        for start, end in zip(starts, starts[1:], strict=False):
            if start <= now < end:
                return start, end
        raise AssertionError("now outside the day window")

    def _usage(self, quota: DailyQuota, now: int) -> tuple[int, int, int, int]:
        day, end = self._day(quota, now)
        stored_day, used, granted = self.quota.get(quota.counter, (0, 0, 0))
        return (day, end, used, granted) if stored_day == day else (day, end, 0, 0)

    def decide(self, cost: int, now: int) -> tuple[Answer, list[int]]:
        rows: list[tuple[int | None, int, int | None]] = []
        new_tats: dict[str, int] = {}
        days: list[int] = []
        for b in self.limits.buckets:
            tat = max(self.tat.get(b.counter, now), now)
            # GCRA: admit if the bucket, refilled one unit per interval since `tat`, holds `cost`.
            capacity_at_now = (now - tat) // b.interval_us + b.burst
            after = tat + cost * b.interval_us
            if cost > b.burst:
                rows.append((capacity_at_now, tat - now, None))
            elif after - b.burst * b.interval_us > now:
                rows.append((capacity_at_now, tat - now, after - b.burst * b.interval_us - now))
            else:
                new_tats[b.counter] = after
                rows.append(((now - (after - b.burst * b.interval_us)) // b.interval_us, after - now, 0))
        for q in self.limits.quotas:
            day, end, used, granted = self._usage(q, now)
            days.append(day)
            if q.limit is None:
                rows.append((None, end - now, 0))
                continue
            left = q.limit + granted - used
            if cost > q.limit + granted:
                rows.append((max(left, 0), end - now, None))
            elif cost > left:
                rows.append((max(left, 0), end - now, end - now))
            else:
                rows.append((left - cost, end - now, 0))
        # A shadow limit never refuses; where it would have, it is not charged (as if enforced).
        charged = [r[2] == 0 for r in rows]
        allowed = all(ok or limit.shadow for ok, limit in zip(charged, self.limits, strict=True))
        if allowed and cost > 0:
            self.tat.update(new_tats)
            nb = len(self.limits.buckets)
            for q, day, ok in zip(self.limits.quotas, days, charged[nb:], strict=True):
                if ok:
                    _, _, used, granted = self._usage(q, now)
                    self.quota[q.counter] = (day, used + cost, granted)
        return Answer(allowed, rows), days

    def refund(self, cost: int, days: list[int], now: int, charged: list[bool]) -> None:
        """Give back `cost` to the limits that were `charged` (in LimitSet order)."""
        nb = len(self.limits.buckets)
        for b, ok in zip(self.limits.buckets, charged[:nb], strict=True):
            if not ok:
                continue
            tat = self.tat.get(b.counter)
            if tat is not None and tat > now:
                self.tat[b.counter] = tat - cost * b.interval_us
                if self.tat[b.counter] <= now:
                    del self.tat[b.counter]
        for q, day, ok in zip(self.limits.quotas, days, charged[nb:], strict=True):
            stored = self.quota.get(q.counter)
            if ok and stored and stored[0] == day:
                self.quota[q.counter] = (day, max(stored[1] - cost, 0), stored[2])

    def grant(self, quota: DailyQuota, units: int, now: int) -> None:
        day, _, used, granted = self._usage(quota, now)
        self.quota[quota.counter] = (day, used, granted + units)

    def expire(self, now: int) -> None:
        """Drop what Redis would have expired by `now` (a bucket once full)."""
        self.tat = {k: v for k, v in self.tat.items() if v > now}


def bucket(rate: int, period: int, burst: int, *, shadow: bool = False) -> Bucket:
    return Bucket(name="b", counter="rate", rate=rate, period=period, burst=burst, shadow=shadow)
