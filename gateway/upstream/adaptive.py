"""What the gateway learns of a backend that advertises nothing: a concurrency limit from latency, and a drain rate.

Why Gradient2 (Netflix concurrency-limits): Vegas takes the *minimum* rtt as its baseline, far below a typical image
request when sizes and counts vary tenfold, and starves the limit; AIMD waits for errors, which a deep inference
queue gives long after overload; Envoy's adaptive concurrency pins concurrency low for a window to measure its
baseline, seconds of idle backend each time. Gradient2 compares each rtt with a long *average*, needs no pauses.

Both measures count in images, the unit the fleet admits in. Nothing here does I/O or reads a clock: the caller
passes each request's rtt and, for the drain rate, `now`.
"""

from __future__ import annotations

import math

__all__ = ["DrainMeter", "Gradient2Limit", "LearnedCapacity"]


class Gradient2Limit:
    """How many images may be in flight at one backend, from how its latency moves with its load.

    Each saturated observation moves the estimate a `smoothing` step toward `estimate × gradient + headroom`,
    where `gradient = tolerance × baseline / rtt`, held in [0.5, 1]: at or near the baseline it probes upward by
    `headroom`, above `tolerance × baseline` it shrinks, never by more than half a step at once (one slow outlier
    is not a collapse). The baseline is the mean rtt of the first `warmup` requests, then an exponential average
    over about `long_window` requests. Under demand that never lets up, that average follows the queue the limit
    allows and the limit creeps up with it, about a long window at a time: the price of following a real change in
    the work (larger images) without pausing to measure; `max_limit` bounds it.
    """

    def __init__(
        self,
        *,
        initial_limit: int = 4,
        min_limit: int = 1,
        max_limit: int = 64,
        smoothing: float = 0.2,
        tolerance: float = 1.5,
        long_window: int = 600,
        warmup: int = 10,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"min_limit: expected 1 <= min_limit <= max_limit, got {min_limit} and {max_limit}")
        if not min_limit <= initial_limit <= max_limit:
            raise ValueError(f"initial_limit: expected a number from {min_limit} to {max_limit}, got {initial_limit}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing: expected a number in (0, 1], got {smoothing}")
        if not tolerance >= 1:
            raise ValueError(f"tolerance: expected a ratio of at least 1, got {tolerance}")
        if long_window < 1 or warmup < 1:
            raise ValueError(f"long_window and warmup: expected at least 1 request each, got {long_window}, {warmup}")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self._estimate = float(initial_limit)
        self._smoothing = smoothing
        self._tolerance = tolerance
        self._decay = 2.0 / (long_window + 1)
        self._warmup = warmup
        self._seen = 0
        self._baseline = 0.0

    @property
    def limit(self) -> int:
        """The images that may be in flight now, within [min_limit, max_limit]."""
        return int(self._estimate)

    @property
    def baseline_rtt_s(self) -> float:
        """The long-term average rtt the current one is compared with; 0.0 before the first request."""
        return self._baseline

    def observe(self, rtt_s: float, in_flight: int) -> None:
        """A request finished after `rtt_s` seconds while `in_flight` images (its own included) were in flight."""
        if not (math.isfinite(rtt_s) and rtt_s >= 0):
            raise ValueError(f"rtt_s: expected finite seconds >= 0, got {rtt_s}")
        if in_flight < 0:
            raise ValueError(f"in_flight: expected a count >= 0, got {in_flight}")
        if rtt_s == 0:  # below the clock's resolution: it says nothing of latency
            return
        self._track_baseline(rtt_s)
        # A backend given less than half its limit was never pushed to it: its latency says nothing of the limit.
        if in_flight < self._estimate / 2:
            return
        gradient = min(1.0, max(0.5, self._tolerance * self._baseline / rtt_s))
        target = self._estimate * gradient + self._headroom()
        estimate = self._estimate + self._smoothing * (target - self._estimate)
        self._estimate = min(float(self.max_limit), max(float(self.min_limit), estimate))

    def _track_baseline(self, rtt_s: float) -> None:
        self._seen += 1
        if self._seen <= self._warmup:
            self._baseline += (rtt_s - self._baseline) / self._seen
        else:
            self._baseline += self._decay * (rtt_s - self._baseline)
        # Once a long overload is over, the average still remembers it and would hide the next one for
        # hundreds of requests: bring it down quickly while the current rtt is well below it.
        if self._baseline > 2 * rtt_s:
            self._baseline *= 0.95

    def _headroom(self) -> float:
        # How far the limit probes past what latency supports: one image for the limits an image backend has,
        # growing with the limit's order of magnitude for larger ones.
        return float(max(1, int(math.log10(self._estimate))))


class DrainMeter:
    """Images a backend finished per second of busy time, an exponentially weighted mean over measuring intervals.

    Busy time is time with at least one request in flight, so idle spells neither lower the rate nor count toward
    it; it is the backend's throughput while it has work, which is when a line waits on it. An interval closes at
    `sample` once at least one image finished in it: a request that outlasts several samples adds its whole
    duration to the interval it finishes in.
    """

    def __init__(self, *, weight: float = 0.3) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight: expected a number in (0, 1], got {weight}")
        self._weight = weight
        self._rate: float | None = None
        self._in_flight = 0
        self._since = 0.0  # when busy time was last added up
        self._busy_s = 0.0  # of the open interval
        self._images = 0  # finished in the open interval

    @property
    def images_per_s(self) -> float:
        """The measured rate; 0.0 before the first interval closes."""
        return 0.0 if self._rate is None else self._rate

    def change(self, now: float, in_flight: int, finished_images: int = 0) -> None:
        """At `now`, `finished_images` more images were made, and `in_flight` requests are in flight from now on."""
        if in_flight < 0 or finished_images < 0:
            raise ValueError(f"in_flight and finished_images: expected counts >= 0, got {in_flight}, {finished_images}")
        self._add_busy(now)
        self._in_flight = in_flight
        self._images += finished_images

    def sample(self, now: float) -> None:
        """Close the measuring interval at `now` if an image finished in it; else keep adding to it."""
        self._add_busy(now)
        if self._images == 0 or self._busy_s <= 0:
            return
        rate = self._images / self._busy_s
        self._rate = rate if self._rate is None else self._rate + self._weight * (rate - self._rate)
        self._busy_s, self._images = 0.0, 0

    def _add_busy(self, now: float) -> None:
        if self._in_flight > 0:
            self._busy_s += max(0.0, now - self._since)
        self._since = now


class LearnedCapacity:
    """One backend's learned capacity: its Gradient2 limit and drain rate, fed by the requests sent to it."""

    def __init__(self, limit: Gradient2Limit | None = None, drain: DrainMeter | None = None) -> None:
        self.limiter = limit if limit is not None else Gradient2Limit()
        self.drain = drain if drain is not None else DrainMeter()
        self._images = 0  # in flight
        self._requests = 0

    @property
    def in_flight_images(self) -> int:
        return self._images

    def started(self, images: int, now: float) -> None:
        """A request for `images` images was sent to the backend at `now`."""
        self._images += images
        self._requests += 1
        self.drain.change(now, self._requests)

    def finished(self, rtt_s: float, images: int, ok: bool, now: float) -> None:
        """The request ended at `now` after `rtt_s`; `ok` if it made its images (a failure's rtt is no service time)."""
        if ok:
            self.limiter.observe(rtt_s, max(self._images, images))
        self._images = max(0, self._images - images)
        self._requests = max(0, self._requests - 1)
        self.drain.change(now, self._requests, images if ok else 0)

    def sample(self, now: float) -> None:
        """Close the drain meter's interval at `now` (once per poll)."""
        self.drain.sample(now)
