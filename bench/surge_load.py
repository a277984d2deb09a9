"""The surge's clients: paid accounts on a fixed schedule, and free accounts of two kinds, each after its images.

- paid: open loop, one request every 1/rps seconds whatever the answers, round-robin over the paid keys;
- free, `retry-after`: POST; on a 503 (or a 429 rate limit) sleep its Retry-After and send the same request
  again, until the image comes;
- free, `async`: POST with `Prefer: respond-async`; a 202 is a job: GET it at its Retry-After until it is
  done. A job gone, or stuck for LOST_AFTER_S, is counted and asked for again. A gateway that
  answers no 202 (one without jobs) makes this client a `retry-after` client.

Every request goes to the next live gateway replica in turn; one that cannot be reached (killed) is retried
at once on the next. What the figures need is kept here: every paid latency, every free request by kind,
when each image was first asked for and when it came, the ETA each job was told, and how many images were
waiting (their client told to come back, or their job queued) at each moment.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

from gateway.upstream.client import Origin, UpstreamClient, UpstreamError

PATH = "/v1/images/generations"
JOBS_PATH = "/v1/images/jobs/"
REQUEST_BODY = b'{"prompt": "launch day"}'
KINDS = ("retry-after", "async")
# A job seen running this long has lost its replica (a dead replica's job never ends): ask for the image again.
LOST_AFTER_S = 30.0
# A client told to come back later than this gives up on its image (a 429 until the day ends, say).
GIVE_UP_AFTER_S = 600.0


class Gateways:
    """The live gateway replicas, taken in turn."""

    def __init__(self, urls: list[str]) -> None:
        self._origins = [Origin.parse(url) for url in urls]
        self._next = 0

    def pick(self) -> Origin:
        self._next += 1
        return self._origins[self._next % len(self._origins)]

    def add(self, url: str) -> None:
        self._origins.append(Origin.parse(url))

    def remove(self, url: str) -> None:
        self._origins = [origin for origin in self._origins if origin != Origin.parse(url)]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        try:
            data = json.loads(self.body)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def message(self) -> str:
        """The start of an error's message (enough to tell its kind)."""
        error = self.json().get("error")
        return str(error.get("message", ""))[:70] if isinstance(error, dict) else ""

    def retry_after(self, default: float = 1.0) -> float:
        value = self.headers.get("retry-after", "")
        return float(value) if value.isdigit() else default


@dataclass
class Tally:
    """What the clients saw. Times are seconds since `started` (monotonic) unless named `_wall`."""

    started: float = field(default_factory=time.monotonic)
    # Paid: when each request was sent, how long its answer took, its status. Arrays, out of the collector's scans.
    paid_at: array[float] = field(default_factory=lambda: array("d"))
    paid_ms: array[float] = field(default_factory=lambda: array("d"))
    paid_status: array[int] = field(default_factory=lambda: array("h"))
    # Free: requests by (kind, method, status); images asked and delivered by kind.
    requests: Counter[str] = field(default_factory=Counter)
    delivered: Counter[str] = field(default_factory=Counter)
    # Per free account: its kind, when it arrived, and the seconds it waited for its images in all.
    account_kind: array[int] = field(default_factory=lambda: array("b"))
    account_arrived: array[float] = field(default_factory=lambda: array("d"))
    account_wait: array[float] = field(default_factory=lambda: array("d"))
    # Jobs: id, the ETA told in its 202 (s) and when the 202 came (s since the epoch).
    etas: list[tuple[str, float, float]] = field(default_factory=list)
    # Retry-After clients told a turn by the line (Quotagate-Line): the wait told first, and how long it was
    # from then to sending the request that was let in.
    turns: list[tuple[float, float]] = field(default_factory=list)
    jobs: Counter[str] = field(default_factory=Counter)  # how jobs ended: done, failed, gone, stuck running...
    errors: Counter[str] = field(default_factory=Counter)  # answers other than 200/202/503, with their message
    waiting: int = 0  # images whose client was told to come back, or whose job waits, now
    gave_up: int = 0

    def now(self) -> float:
        return time.monotonic() - self.started


async def send(
    client: UpstreamClient, gateways: Gateways, method: str, path: str, headers: tuple[tuple[str, str], ...],
    body: bytes = b"",
) -> Reply | None:  # fmt: skip
    """One request to the next replica; None when the replica could not be reached or broke off."""
    try:
        answer = await client.send(gateways.pick(), method, path, headers, body)
        try:
            content = await answer.read()
        finally:
            answer.release()
    except UpstreamError:
        return None
    fields = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in answer.headers}
    return Reply(answer.status, fields, content)


def _line_wait(reply: Reply) -> float | None:
    """The wait a line told in `Quotagate-Line: position=N, wait=S`, if the answer has one."""
    for item in reply.headers.get("quotagate-line", "").split(","):
        name, _, value = item.strip().partition("=")
        if name == "wait":
            return float(value)
    return None


def _headers(key: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("Authorization", f"Bearer {key}"), ("Content-Type", "application/json"), *extra)


async def paid_load(client: UpstreamClient, gateways: Gateways, keys: list[str], rps: float, until: asyncio.Event,
                    tally: Tally) -> None:  # fmt: skip
    """Open loop: one request every 1/rps seconds, round-robin over the paid keys, until `until` is set."""

    async def one(key: str) -> None:
        sent = time.monotonic()
        reply = await send(client, gateways, "POST", PATH, _headers(key), REQUEST_BODY)
        tally.paid_at.append(sent - tally.started)
        tally.paid_ms.append((time.monotonic() - sent) * 1000)
        tally.paid_status.append(reply.status if reply else 0)
        if reply is not None and reply.status != 200:
            tally.errors[f"paid {reply.status} {reply.message()}"] += 1

    tasks: set[asyncio.Task[None]] = set()
    start, i = time.monotonic(), 0
    while not until.is_set():
        task = asyncio.create_task(one(keys[i % len(keys)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        await asyncio.sleep(max(0.0, start + i / rps - time.monotonic()))
    await asyncio.gather(*tasks)


class FreeAccount:
    """One free account after `images` images, one after the other, as a client of `kind`."""

    def __init__(self, client: UpstreamClient, gateways: Gateways, tally: Tally, key: str, kind: str) -> None:
        self._client, self._gateways, self._tally = client, gateways, tally
        self._key, self._kind = key, kind
        self._waiting = False

    async def run(self, images: int) -> None:
        tally = self._tally
        index = len(tally.account_kind)
        tally.account_kind.append(KINDS.index(self._kind))
        tally.account_arrived.append(tally.now())
        tally.account_wait.append(math.nan)
        waited = 0.0
        try:
            for _ in range(images):
                asked = tally.now()
                if await self._one_image():
                    tally.delivered[self._kind] += 1
                    waited += tally.now() - asked
                self._done_waiting()
        finally:
            self._done_waiting()
            tally.account_wait[index] = waited

    async def _one_image(self) -> bool:
        """Ask until the image comes; False if it never will (refused for the day, or told to wait too long)."""
        prefer = (("Prefer", "respond-async"),) if self._kind == "async" else ()
        headers = _headers(self._key, *prefer)
        told: tuple[float, float] | None = None  # the first turn a line told it: (seconds, when it was told)
        while True:
            sent = time.monotonic()
            reply = await self._request("POST", PATH, headers, REQUEST_BODY)
            if reply is None:
                continue  # its replica is gone: at once to the next
            if reply.status == 200:
                if told is not None:
                    self._tally.turns.append((told[0], sent - told[1]))
                return True
            turn = _line_wait(reply)
            if told is None and turn is not None:
                told = (turn, time.monotonic())
            if reply.status == 202:
                if await self._follow_job(reply):
                    return True
                continue
            if not await self._come_back(reply):
                return False

    async def _follow_job(self, accepted: Reply) -> bool:
        """GET the job at each Retry-After until it is done; False if it failed or was lost (ask again).

        A job is lost when it is gone (404), or stuck: running, or queued with no place in the line (a queued
        job the line knows shows its position), for LOST_AFTER_S.
        """
        tally = self._tally
        body = accepted.json()
        job = str(body.get("id"))
        tally.etas.append((job, float(body.get("eta_s", 0.0)), time.time()))  # type: ignore[arg-type]
        self._start_waiting()
        wait, stuck_since = accepted.retry_after(), None
        while True:
            await asyncio.sleep(wait)
            reply = await self._request("GET", JOBS_PATH + job, _headers(self._key))
            wait = reply.retry_after() if reply is not None else 0.0
            if reply is None or reply.status != 200:
                if reply is not None and reply.status == 404:
                    tally.jobs["gone"] += 1
                    return False
                continue  # unreachable, or an error: asked again at its Retry-After
            view = reply.json()
            status = view.get("status")
            if status in ("done", "failed", "cancelled"):
                tally.jobs[str(status)] += 1
                return status == "done"
            stuck = status == "running" or "position" not in view
            if not stuck:
                stuck_since = None
                continue
            stuck_since = tally.now() if stuck_since is None else stuck_since
            if tally.now() - stuck_since > LOST_AFTER_S:
                tally.jobs[f"stuck {status}"] += 1
                return False

    async def _come_back(self, reply: Reply) -> bool:
        """Sleep the Retry-After of a 503 or 429; False if the image will not come today. Anything else is a
        failure, tried again in a second."""
        wait = 1.0
        if reply.status in (429, 503):
            wait = reply.retry_after()
            if reply.json().get("error", {}).get("code") == "insufficient_quota" or wait > GIVE_UP_AFTER_S:  # type: ignore[union-attr]
                self._tally.gave_up += 1
                return False
        self._start_waiting()
        await asyncio.sleep(wait)
        return True

    async def _request(
        self, method: str, path: str, headers: tuple[tuple[str, str], ...], body: bytes = b""
    ) -> Reply | None:
        reply = await send(self._client, self._gateways, method, path, headers, body)
        self._tally.requests[f"{self._kind} {method} {reply.status if reply else 'unreachable'}"] += 1
        if reply is not None and reply.status not in (200, 202, 503):
            self._tally.errors[f"{self._kind} {method} {reply.status} {reply.message()}"] += 1
        return reply

    def _start_waiting(self) -> None:
        if not self._waiting:
            self._waiting = True
            self._tally.waiting += 1

    def _done_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            self._tally.waiting -= 1


async def free_surge(client: UpstreamClient, gateways: Gateways, keys: list[str], window: float, images: int,
                     tally: Tally) -> None:  # fmt: skip
    """Account i arrives at i/len(keys) of the window; even accounts honour Retry-After, odd ones use jobs."""
    # Only the accounts still trying are kept: finished tasks would slow this process's collector, and its
    # pauses would count as the gateway's latency.
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    for i, key in enumerate(keys):
        await asyncio.sleep(max(0.0, start + window * i / len(keys) - time.monotonic()))
        account = FreeAccount(client, gateways, tally, key, KINDS[i % 2])
        task = asyncio.create_task(account.run(images))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*tasks)
