"""Each upstream's capacity, learned rather than configured: polled from the backend, or learned from its latency.

Every `every` seconds the watcher sends one `GET /v1/capacity` to each backend URL and reports to a sink (the
fleet's shared view, kept in Redis by the caller):

- a valid reading: `slots + queue_images` images (0 while the model loads: it takes nothing) and its drain rate;
- a 404: the backend advertises nothing (a third-party server), so the watcher advertises for it the Gradient2
  limit and drain rate learned from the requests sent there (gateway/upstream/adaptive.py), which the request
  path reports with `started` and `finished` (each replica learns from its own requests: the rate it advertises
  is what its own requests drained);
- no answer, a timeout, any other status, or a reading that is not what it should be: `forget`, at once, so its
  capacity leaves the fleet within one poll; as does a backend passive health has set aside.

Each advertisement lives `3 × every` seconds unless a replica refreshes it: a backend that no replica reaches,
or whose only replica died, leaves the fleet by itself. A state is logged when it changes, never once per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config.addresses import Origin
from gateway.upstream.adaptive import LearnedCapacity
from gateway.upstream.client import Answer, UpstreamClient, UpstreamError

__all__ = ["CAPACITY_PATH", "CapacitySink", "CapacityWatcher", "Reading", "parse_reading"]

CAPACITY_PATH = "/v1/capacity"
# A reading is ~130 bytes; a third-party server's 404 page may be a few KiB of HTML. Past this, no answer.
MAX_ANSWER_BYTES = 64 * 1024
# The most images one backend may claim: a bound on how far one wrong or hostile answer can open the fleet.
MAX_IMAGES = 1_000_000
_COUNTS = ("slots", "queue_images", "queued_images", "running_images")
_ACCEPT = (("Accept", "application/json"),)

log = logging.getLogger("quotagate.capacity")


class CapacitySink(Protocol):
    """Where learned capacity goes: the fleet's shared view of each pool."""

    async def advertise(self, pool: str, backend: str, images: int, images_per_s: float, ttl: float) -> None: ...

    async def forget(self, pool: str, backend: str) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """One valid answer of `GET /v1/capacity`."""

    slots: int  # images one pipeline call runs at once
    queue_images: int  # the queue's bound, in images
    queued_images: int
    running_images: int
    images_per_s: float  # the backend's measured drain rate
    ready: bool  # the model is loaded and warm

    @property
    def images(self) -> int:
        """What the backend can hold now: all its places when ready, nothing while its model loads."""
        return self.slots + self.queue_images if self.ready else 0


def parse_reading(body: bytes) -> Reading:
    """The reading in a `/v1/capacity` body; ValueError naming the field that is missing or wrong."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    # Fields beyond these are allowed: a backend may advertise more than this gateway reads.
    counts = {name: _count(data, name) for name in _COUNTS}
    rate = _field(data, "images_per_s")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate < 0:
        raise ValueError(f"images_per_s: expected a finite number >= 0, got {rate!r}")
    ready = _field(data, "ready")
    if not isinstance(ready, bool):
        raise ValueError(f"ready: expected true or false, got {ready!r}")
    return Reading(**counts, images_per_s=float(rate), ready=ready)


def _field(data: dict[str, Any], name: str) -> Any:
    if name not in data:
        raise ValueError(f"{name}: missing")
    return data[name]


def _count(data: dict[str, Any], name: str) -> int:
    value = _field(data, name)
    # bool is an int in Python; `true` is no count.
    if type(value) is not int or not 0 <= value <= MAX_IMAGES:
        raise ValueError(f"{name}: expected a whole number from 0 to {MAX_IMAGES}, got {value!r}")
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("a field appears twice")
    return data


class _State(enum.Enum):
    ADVERTISED = "advertises its capacity"
    LEARNED = "advertises nothing (404): its capacity is learned from its latency"
    FAILED = "is left out of the fleet"
    SET_ASIDE = "is set aside by passive health and left out of the fleet"


# What one poll of a backend found: its reading, None for a 404, or why it failed.
_Polled = Reading | None | str


class CapacityWatcher:
    """Polls every backend of every pool for its capacity and reports it to `sink`; see the module's docstring.

    `set_aside(pool, url)` says whether passive health has set a backend aside (Forwarder.is_set_aside);
    `clock` times `started` and `finished` for the drain rate of backends that advertise nothing.
    """

    def __init__(
        self,
        client: UpstreamClient,
        pools: Mapping[str, Sequence[str]],
        sink: CapacitySink,
        *,
        every: float = 1.0,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        set_aside: Callable[[str, str], bool] | None = None,
        learn: Callable[[], LearnedCapacity] = LearnedCapacity,
    ) -> None:
        if not (math.isfinite(every) and every > 0):
            raise ValueError(f"every: expected seconds above 0, got {every!r}")
        self.every = every
        self.timeout = every if timeout is None else timeout
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout: expected seconds above 0, got {timeout!r}")
        self._client = client
        self._sink = sink
        self._clock = clock
        self._set_aside = set_aside
        self._pools = {pool: tuple(urls) for pool, urls in pools.items()}
        # A URL named in two pools is still asked once a round.
        self._origins = {url: Origin.parse(url) for urls in self._pools.values() for url in urls}
        self._learned = {(pool, url): learn() for pool, urls in self._pools.items() for url in urls}
        self._states: dict[tuple[str, str], _State] = {}
        self._sink_problem: str | None = None
        self._last_round = -math.inf  # when the last round began, on `clock`
        self._refreshing: asyncio.Future[None] | None = None
        self._round_problem: str | None = None

    @property
    def ttl(self) -> float:
        """Seconds an advertisement lives unless refreshed: three polls, so one lost answer drops nothing."""
        return 3 * self.every

    def started(self, pool: str, backend: str, images: int) -> None:
        """The request path sent a request for `images` images to `backend` of `pool`.

        Each `started` needs its one `finished`, with ok=False for a request that failed or was withdrawn:
        they keep the count of images in flight that the learned limit and drain rate are measured against.
        """
        self._learned_of(pool, backend).started(images, self._clock())

    def finished(self, pool: str, backend: str, rtt_s: float, images: int, ok: bool) -> None:
        """A request sent with `started` ended after `rtt_s` seconds; `ok` if the backend made its images."""
        self._learned_of(pool, backend).finished(rtt_s, images, ok, self._clock())

    async def poll_once(self, now: float) -> None:
        """One round: ask every backend, then advertise or forget each one; sink errors are logged, not raised."""
        self._last_round = self._clock()
        backends = list(self._origins)
        answers = await asyncio.gather(*(self._poll(self._origins[url]) for url in backends))
        polled = dict(zip(backends, answers, strict=True))
        for learned in self._learned.values():
            learned.sample(now)
        reports = []
        for pool, urls in self._pools.items():
            aside = self._aside(pool)
            reports += [self._report(pool, url, polled[url], url in aside) for url in urls]
        outcomes = await asyncio.gather(*reports, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancelled: the round is over
        failures = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        self._note_sink(failures[0] if failures else None)

    async def refresh(self) -> None:
        """A round now, for a request that found no live backend (one may have just come up, or Redis lost the
        readings): one round at a time, shared by every request waiting on it, begun at least a quarter of a
        second (or a tenth of `every`) after the last one began."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._round_soon())
        await asyncio.shield(self._refreshing)

    async def _round_soon(self) -> None:
        # A round begun just before the backend came up saw it down: wait out the gap, then look again.
        gap = self._last_round + min(self.every / 10, 0.25) - self._clock()
        if gap > 0:
            await asyncio.sleep(gap)
        await self.poll_once(self._clock())

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `every` seconds until `stop` is set."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            began = loop.time()
            try:
                await self.poll_once(self._clock())
            except Exception as exc:  # a watcher that stopped would let every advertisement lapse: go on
                self._note_round(exc)
            else:
                self._note_round(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, began + self.every - loop.time()))

    def _learned_of(self, pool: str, backend: str) -> LearnedCapacity:
        try:
            return self._learned[pool, backend]
        except KeyError:
            raise KeyError(f"{backend!r} is not a backend of pool {pool!r}") from None

    async def _poll(self, origin: Origin) -> _Polled:
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self._client.send(origin, "GET", CAPACITY_PATH, _ACCEPT, b"")
                try:
                    status = answer.status
                    if status not in (200, 404):  # its body is not read: the connection is closed, not kept
                        return f"{CAPACITY_PATH} answered {status}"
                    body = await _bounded_body(answer)
                finally:
                    answer.release()
        except TimeoutError:
            return f"no answer to {CAPACITY_PATH} within {self.timeout:g}s"
        except UpstreamError as exc:
            return str(exc)
        if body is None:
            return f"the answer to {CAPACITY_PATH} is larger than {MAX_ANSWER_BYTES // 1024} KiB"
        if status == 404:
            return None
        try:
            return parse_reading(body)
        except ValueError as exc:
            return f"an invalid capacity reading: {exc}"

    def _aside(self, pool: str) -> frozenset[str]:
        """The URLs of `pool` passive health has set aside; none if all are, since the forwarder then tries them all."""
        if self._set_aside is None:
            return frozenset()
        urls = self._pools[pool]
        aside = frozenset(url for url in urls if self._set_aside(pool, url))
        return frozenset() if len(aside) == len(urls) else aside

    async def _report(self, pool: str, url: str, polled: _Polled, set_aside: bool) -> None:
        if set_aside:
            self._note(pool, url, _State.SET_ASIDE)
            await self._sink.forget(pool, url)
        elif isinstance(polled, Reading):
            self._note(pool, url, _State.ADVERTISED)
            await self._sink.advertise(pool, url, polled.images, polled.images_per_s, self.ttl)
        elif polled is None:
            self._note(pool, url, _State.LEARNED)
            learned = self._learned[pool, url]
            await self._sink.advertise(pool, url, learned.limiter.limit, learned.drain.images_per_s, self.ttl)
        else:
            self._note(pool, url, _State.FAILED, polled)
            await self._sink.forget(pool, url)

    def _note(self, pool: str, url: str, state: _State, detail: str = "") -> None:
        """Log a backend's state when it changes: once, not once per poll, nor once per way of failing."""
        if self._states.get((pool, url)) == state:
            return
        self._states[pool, url] = state
        level = logging.INFO if state in (_State.ADVERTISED, _State.LEARNED) else logging.WARNING
        log.log(level, "capacity: %s (pool %s) %s%s", url, pool, state.value, f": {detail}" if detail else "")

    def _note_round(self, problem: Exception | None) -> None:
        text = None if problem is None else f"{type(problem).__name__}: {problem}"
        if text != self._round_problem and text is not None:
            log.error("capacity: a round of polls failed: %s", text, exc_info=problem)
        self._round_problem = text

    def _note_sink(self, problem: Exception | None) -> None:
        text = None if problem is None else f"{type(problem).__name__}: {problem}"
        if text == self._sink_problem:
            return
        if text is None:
            log.info("capacity: reports reach the fleet's view again")
        else:
            log.warning("capacity: could not report to the fleet's view: %s", text)
        self._sink_problem = text


async def _bounded_body(answer: Answer) -> bytes | None:
    """The whole body, or None past MAX_ANSWER_BYTES."""
    if answer.content_length is not None and answer.content_length > MAX_ANSWER_BYTES:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in answer.chunks():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return None
        parts.append(chunk)
    return b"".join(parts)
