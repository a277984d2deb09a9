"""The learned capacity of a backend that advertises nothing: the Gradient2 limit and the measured drain rate."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.upstream.adaptive import DrainMeter, Gradient2Limit, LearnedCapacity

_rtts = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
_observations = st.lists(st.tuples(_rtts, st.integers(min_value=0, max_value=1000)), max_size=300)


@st.composite
def _limits(draw: st.DrawFn) -> Gradient2Limit:
    low = draw(st.integers(min_value=1, max_value=20))
    high = draw(st.integers(min_value=low, max_value=500))
    return Gradient2Limit(
        initial_limit=draw(st.integers(min_value=low, max_value=high)),
        min_limit=low,
        max_limit=high,
        smoothing=draw(st.floats(min_value=0.01, max_value=1.0)),
        tolerance=draw(st.floats(min_value=1.0, max_value=4.0)),
        long_window=draw(st.integers(min_value=1, max_value=1000)),
        warmup=draw(st.integers(min_value=1, max_value=50)),
    )


@given(_limits(), _observations)
def test_the_limit_always_stays_within_its_bounds(
    limiter: Gradient2Limit, observations: list[tuple[float, int]]
) -> None:
    for rtt, in_flight in observations:
        limiter.observe(rtt, in_flight)
        assert limiter.min_limit <= limiter.limit <= limiter.max_limit
        assert isinstance(limiter.limit, int)


@given(_limits(), _observations, st.lists(_rtts, max_size=100))
def test_a_backend_given_less_than_half_its_limit_never_moves_it(
    limiter: Gradient2Limit, observations: list[tuple[float, int]], rtts: list[float]
) -> None:
    for rtt, in_flight in observations:
        limiter.observe(rtt, in_flight)
    limit = limiter.limit
    for rtt in rtts:
        # Below half the limit: the latency of a backend never pushed says nothing of what it can take.
        limiter.observe(rtt, math.ceil(limit / 2) - 1)
    assert limiter.limit == limit


# A rise to `factor` × the baseline, in `ramp` steady steps, then held. The limit falls toward
# headroom / (1 - gradient): with the gradient at 0.5 or more, a few images, so it starts above that.
@given(
    before=st.integers(min_value=5, max_value=64),
    baseline=st.floats(min_value=1e-3, max_value=100.0),
    warm=st.integers(min_value=10, max_value=50),
    factor=st.floats(min_value=3.0, max_value=20.0),
    steps=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=0, max_size=49),
    hold=st.integers(min_value=30, max_value=100),
)
def test_the_limit_falls_when_latency_rises_steadily_and_recovers_when_it_returns(
    before: int, baseline: float, warm: int, factor: float, steps: list[float], hold: int
) -> None:
    limiter = Gradient2Limit(initial_limit=before, max_limit=64)
    for _ in range(warm):  # a light load teaches the baseline and leaves the limit where it is
        limiter.observe(baseline, 1)
    assert limiter.limit == before

    for fraction in [*sorted(steps), 1.0]:  # rises steadily, each request at the limit
        limiter.observe(baseline * (1 + (factor - 1) * fraction), limiter.limit)
    for _ in range(hold):
        limiter.observe(baseline * factor, limiter.limit)
    fallen = limiter.limit
    assert fallen < before

    # Back at the baseline, the limit climbs back by smoothing × headroom (0.2 × 1 image) a request at least.
    needed = math.ceil((before - fallen) / 0.2) + 1
    for _ in range(needed):
        limiter.observe(baseline, limiter.limit)
    assert limiter.limit >= before


def test_a_rtt_of_zero_carries_no_latency_and_bad_arguments_are_refused() -> None:
    limiter = Gradient2Limit(initial_limit=4)
    limiter.observe(0.0, 4)
    assert limiter.baseline_rtt_s == 0.0 and limiter.limit == 4
    for rtt, in_flight, field in (
        (math.nan, 1, "rtt_s"),
        (-1.0, 1, "rtt_s"),
        (math.inf, 1, "rtt_s"),
        (1.0, -1, "in_flight"),
    ):
        with pytest.raises(ValueError, match=field):
            limiter.observe(rtt, in_flight)
    for options, field in (
        ({"min_limit": 0}, "min_limit"),
        ({"min_limit": 8, "max_limit": 4}, "min_limit"),
        ({"initial_limit": 100}, "initial_limit"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"tolerance": 0.9}, "tolerance"),
        ({"long_window": 0}, "long_window"),
    ):
        with pytest.raises(ValueError, match=field):
            Gradient2Limit(**options)  # type: ignore[arg-type]


def _ewma(rates: list[float], weight: float) -> float:
    rate: float | None = None
    for sample in rates:
        rate = sample if rate is None else rate + weight * (sample - rate)
    return 0.0 if rate is None else rate


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=16),  # images of the request
            st.floats(min_value=0.01, max_value=100.0),  # seconds it was in flight
            st.floats(min_value=0.0, max_value=1000.0),  # idle seconds after it
        ),
        min_size=1,
        max_size=30,
    )
)
def test_the_drain_rate_is_images_per_busy_second_and_idle_time_counts_for_nothing(
    requests: list[tuple[int, float, float]],
) -> None:
    drain, now = DrainMeter(weight=0.3), 5000.0
    for images, busy, idle in requests:
        drain.change(now, 1)
        now += busy
        drain.change(now, 0, images)
        now += idle
        drain.sample(now)
    expected = _ewma([images / busy for images, busy, _ in requests], 0.3)
    assert math.isclose(drain.images_per_s, expected, rel_tol=1e-6)


def test_a_request_that_outlasts_several_samples_counts_its_whole_duration() -> None:
    drain = DrainMeter()
    drain.change(0.0, 1)
    for now in (1.0, 2.0, 3.0):  # polls while it runs: nothing finished, the interval stays open
        drain.sample(now)
        assert drain.images_per_s == 0.0
    drain.change(4.0, 0, 2)
    drain.sample(5.0)
    assert drain.images_per_s == 0.5  # 2 images in 4 busy seconds, not 2 in the last second


def test_two_requests_at_once_share_their_busy_time() -> None:
    learned = LearnedCapacity()
    learned.started(2, now=0.0)
    learned.started(2, now=0.0)
    assert learned.in_flight_images == 4
    learned.finished(1.0, 2, True, now=1.0)
    learned.finished(1.0, 2, True, now=1.0)
    learned.started(1, now=1.5)
    learned.finished(0.5, 1, False, now=2.0)  # failed: its images were never made
    learned.sample(2.0)
    assert learned.in_flight_images == 0
    assert learned.drain.images_per_s == 4 / 1.5


def test_after_a_long_overload_the_baseline_forgets_it_quickly_and_the_next_overload_is_seen() -> None:
    limiter = Gradient2Limit(initial_limit=32, max_limit=64)
    for _ in range(20):
        limiter.observe(1.0, 1)
    for _ in range(400):  # a long overload: the average baseline follows it a long way up
        limiter.observe(10.0, 1)
    assert limiter.baseline_rtt_s > 5.0
    for _ in range(60):  # back to normal, lightly loaded
        limiter.observe(1.0, 1)
    assert limiter.baseline_rtt_s < 2.0
    for _ in range(20):  # three times slower again: an overload, not a new normal
        limiter.observe(3.0, limiter.limit)
    assert limiter.limit < 32
