"""Where calendar days start in a time zone, DST included (a day is 23, 24 or 25 hours long)."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


def day_starts(timezone: ZoneInfo, now: float) -> tuple[int, int, int, int]:
    """Starts of yesterday, today, tomorrow and the day after `now` in `timezone`, µs since the epoch.

    The decide script picks the day that holds the Redis server's time among these, so a caller
    whose clock is off by less than a day still charges the right day.
    """
    starts = _current.get(timezone)
    if starts is None or not starts[1] <= now * 1_000_000 < starts[2]:
        starts = _starts(timezone, datetime.fromtimestamp(now, timezone).date())
        _current[timezone] = starts
    return starts


# The answer for the day most recently asked about, per time zone: nearly every call falls in it.
_current: dict[ZoneInfo, tuple[int, int, int, int]] = {}


@lru_cache(maxsize=256)
def _starts(timezone: ZoneInfo, today: date) -> tuple[int, int, int, int]:
    d0, d1, d2, d3 = (_midnight(timezone, today + timedelta(days=k)) for k in (-1, 0, 1, 2))
    return d0, d1, d2, d3


def _midnight(timezone: ZoneInfo, day: date) -> int:
    # Where a DST jump skips midnight itself, fold=0 resolves it to the instant of the jump.
    return int(datetime.combine(day, time(0), tzinfo=timezone).timestamp()) * 1_000_000
