"""Attacks on the reservation line and async jobs, from the outside: real gateway processes on one Redis, before
an image service that advertises what the test tells it and counts what it holds.

What they hold the fleet to:
- the image service never holds more than it advertises, whatever it advertises;
- a refused request is told its turn; an account keeps one turn per plan line and holds at most its plan's
  `concurrency` places in the line; the line is capped; a later arrival is never told an earlier time; paid first;
- a job is its account's alone, whatever the path or method; it ends (done or failed), even if its replica dies;
- an image is charged once when made and delivered, never for a job that failed, was cancelled or never began.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial.line_fleet import PATH, SLOW, Fleet, auth, fleet, reading, until
from tests.adversarial.wire import RawAnswer, exchange, request_bytes
from tests.support.processes import ServiceSet
from tests.support.quotas import plan, quotas_yaml

pytestmark = pytest.mark.slow

CONCURRENCY = 3
Move = TypeVar("Move")
Answer = TypeVar("Answer")


def quotas(pool: str = "") -> str:
    """A free plan of 3 images a day and 3 places at once; a paid plan ahead of it with a daily count to read."""
    return quotas_yaml(
        plan("free", daily=3, rate=600, burst=100, concurrency=CONCURRENCY),
        plan("paid", priority=10, daily=100000, rate=60000, burst=1000, concurrency=64),
        pool="reserved_for_paid: 0" + (f", {pool}" if pool else ""),
    )


StartFleet = Callable[..., Fleet]


@pytest.fixture
def start_fleet(tmp_path: Path, redis_url: str) -> Iterator[StartFleet]:
    """Starts a fleet (line_fleet.fleet's options) on the test's Redis; stops its processes at the test's end."""
    services = ServiceSet(tmp_path)
    started: list[Fleet] = []

    def start(quotas: str, advertised: str, **options: Any) -> Fleet:
        started.append(fleet(services, redis_url, quotas, advertised, **options))
        return started[-1]

    yield start
    services.stop()
    for each in started:
        each.client.close()


def line_of(answer: httpx.Response) -> tuple[int, int]:
    """(position, wait) of a 503 that gave a turn in the line."""
    assert answer.status_code == 503, answer.text
    position, wait = (part.strip().split("=")[1] for part in answer.headers["Quotagate-Line"].split(","))
    assert int(answer.headers["Retry-After"]) == int(wait)
    return int(position), int(wait)


def place_of(answer: httpx.Response) -> int | None:
    """The position a 503 ticket or a 202 job was given; None for any other answer."""
    if answer.status_code == 202:
        return int(answer.json()["position"])
    if answer.status_code == 503 and "Quotagate-Line" in answer.headers:
        return line_of(answer)[0]
    return None


# --- places: one account cannot crowd the line -------------------------------------------------------------------


def test_one_account_never_holds_more_places_in_the_line_than_its_concurrency(start_fleet: StartFleet) -> None:
    """Tickets and jobs, sent one by one or all at once, from two keys of one account through two replicas:
    the places the account holds in the line are counted by where a newcomer lands before and after."""
    line = start_fleet(quotas("line_length: 100000"), reading(), hold_limit=1, replicas=2)
    holder = line.key("holder", "paid")
    line.hold(line.gateways[0], holder)
    moves = st.tuples(st.integers(0, 1), st.integers(0, 1), st.booleans())  # (key, replica, async)

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(sent=st.lists(moves, min_size=1, max_size=10), together=st.booleans())
    def crowd(sent: list[tuple[int, int, bool]], together: bool) -> None:
        account = f"crowd-{uuid.uuid4().hex[:8]}"
        keys = [line.key(account), line.key(account)]
        before = newcomer_position(line)

        def send(move: tuple[int, int, bool]) -> httpx.Response:
            which, replica, asynchronous = move
            return line.post(line.gateways[replica], keys[which], asynchronous=asynchronous)

        answers = _all_at_once(send, sent) if together else [send(move) for move in sent]
        assert all(a.status_code in (202, 429, 503) for a in answers), [a.text for a in answers]
        held = newcomer_position(line) - before - 1
        assert held <= CONCURRENCY, f"{account} holds {held} places: {[place_of(a) for a in answers]}"

    crowd()


def newcomer_position(line: Fleet) -> int:
    """Where a fresh account lands in the free line now (its ticket stays: the next newcomer lands behind it)."""
    return line_of(line.post(line.gateways[0], line.key(f"newcomer-{uuid.uuid4().hex[:8]}")))[0]


def _all_at_once(send: Callable[[Move], Answer], moves: list[Move]) -> list[Answer]:
    """`send` called on each move, in threads released together; the answers in the moves' order."""
    answers: list[Answer | None] = [None] * len(moves)
    start = threading.Barrier(len(moves))

    def one(index: int) -> None:
        start.wait()
        answers[index] = send(moves[index])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(moves))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [a for a in answers if a is not None]


def test_a_rush_of_accounts_through_two_replicas_never_passes_the_line_cap(start_fleet: StartFleet) -> None:
    line = start_fleet(quotas("line_length: 5"), reading(), hold_limit=1, replicas=2)
    line.hold(line.gateways[0], line.key("holder", "paid"))
    keys = [line.key(f"rush-{i}") for i in range(16)]

    def send(index: int) -> httpx.Response:
        return line.post(line.gateways[index % 2], keys[index], asynchronous=index % 2 == 1)

    answers = _all_at_once(send, list(range(16)))
    places = sorted(p for p in map(place_of, answers) if p is not None)
    assert places == [1, 2, 3, 4, 5]
    refused = [a for a in answers if place_of(a) is None]
    assert all(a.status_code == 503 and int(a.headers["Retry-After"]) > 0 for a in refused)
    assert line.stats()["arrivals"] == ["holder"]


# --- turns: told honestly, kept, never overtaken ----------------------------------------------------------------


def test_a_refusal_for_a_full_line_never_names_an_earlier_time_than_the_turns_before_it(
    start_fleet: StartFleet,
) -> None:
    """The line holds three; the fourth is refused. Coming back at the time it is told must not put it before the
    three told to wait longer: a later arrival is never told an earlier time than one before it."""
    line = start_fleet(quotas("line_length: 3"), reading(), hold_limit=1)
    (gateway,) = line.gateways
    line.hold(gateway, line.key("holder", "paid"))
    told = [line.post(gateway, line.key(who)) for who in ("first", "second", "third")]
    waits = [line_of(answer)[1] for answer in told]
    refused = line.post(gateway, line.key("fourth"))
    assert refused.status_code == 503 and "Quotagate-Line" not in refused.headers
    assert int(refused.headers["Retry-After"]) >= max(waits) - 1, (waits, refused.headers["Retry-After"])


def test_a_later_arrival_is_never_told_an_earlier_turn_even_when_the_drain_rate_jumps(start_fleet: StartFleet) -> None:
    """Tickets and jobs of many accounts, in rushes through two replicas, the advertised drain rate changed between
    the rushes: ordered by position, the turns they are told (arrival + wait) never go back in time."""
    line = start_fleet(quotas("line_length: 100000"), reading(), hold_limit=1, replicas=2)
    line.hold(line.gateways[0], line.key("holder", "paid"))
    turns: list[tuple[int, float]] = []
    for rush, rate in enumerate((SLOW, 2.0, 50.0, SLOW, 0.5)):
        line.advertise(reading(images_per_s=rate))
        keys = [line.key(f"rush{rush}-{i}") for i in range(8)]

        def send(index: int, keys: list[str] = keys) -> tuple[float, httpx.Response]:
            answer = line.post(line.gateways[index % 2], keys[index], asynchronous=index % 3 == 0)
            return time.time(), answer

        for at, answer in _all_at_once(send, list(range(8))):
            position = place_of(answer)
            assert position is not None, answer.text
            turns.append((position, at + int(answer.headers["Retry-After"])))
    turns.sort()
    assert [p for p, _ in turns] == list(range(1, len(turns) + 1))
    # Retry-After is whole seconds: a turn may read up to a second early.
    overtaken = [(a, b) for a, b in zip(turns, turns[1:], strict=False) if b[1] < a[1] - 1.5]
    assert not overtaken, overtaken


def test_early_retries_keep_the_turn_and_never_push_it_back(start_fleet: StartFleet) -> None:
    line = start_fleet(quotas(), reading(), hold_limit=1, replicas=2)
    one, two = line.gateways
    line.hold(one, line.key("holder", "paid"))
    ahead, eager, eager_again, behind = line.key("ahead"), line.key("eager"), line.key("eager"), line.key("behind")
    assert line_of(line.post(one, ahead))[0] == 1
    position, first_wait = line_of(line.post(two, eager))
    told_at = time.monotonic()
    assert position == 2
    assert line_of(line.post(one, behind))[0] == 3
    for attempt in range(8):
        gateway, key = (one, two)[attempt % 2], (eager, eager_again)[attempt // 2 % 2]
        answer = line.post(gateway, key, asynchronous=attempt == 7)
        if answer.status_code == 202:  # a job is a place of its own, behind the line; the ticket stays
            continue
        again, wait = line_of(answer)
        assert again == 2
        assert wait <= first_wait - int(time.monotonic() - told_at) + 1
    assert line_of(line.post(two, behind))[0] == 3


def test_paid_requests_go_first_and_the_free_line_then_goes_in_order(start_fleet: StartFleet) -> None:
    line = start_fleet(quotas(), reading(), hold_limit=1, replicas=2)
    one, two = line.gateways
    line.hold(one, line.key("holder", "paid"))
    a, b, paid = line.key("a"), line.key("b"), line.key("p", "paid")
    assert line_of(line.post(one, a))[0] == 1
    assert line_of(line.post(two, b))[0] == 2
    assert line.post(one, paid).status_code == 503
    line.control(gate="open")
    until(lambda: line.stats()["held"] == 0, "the holder is answered")
    assert line.post(two, a).status_code == 503  # paid comes first
    assert line.post(one, b).status_code == 503
    assert line.post(two, paid).status_code == 200
    assert line.post(one, b).status_code == 503  # then a, who came before b
    assert line.post(two, a).status_code == 200
    assert line.post(one, b).status_code == 200
    assert line.stats()["arrivals"] == ["holder", "p", "a", "b"]


def test_the_line_stays_first_come_first_served_when_the_drain_rate_rises(start_fleet: StartFleet) -> None:
    """A later arrival is told no earlier turn than one before it: when the drain rate rises, it is told the same.
    Told the same turn, it must still come after: the one before it keeps the place when it frees."""
    line = start_fleet(quotas(), reading(), hold_limit=1, replicas=2)
    one, two = line.gateways
    line.hold(one, line.key("holder", "paid"))
    first, later = line.key("first"), line.key("later")
    assert line_of(line.post(one, first))[0] == 1
    line.advertise(reading(images_per_s=100.0))
    line.post(two, later)
    line.control(gate="open")
    until(lambda: line.stats()["held"] == 0, "the holder is answered")
    assert line.post(two, later).status_code == 503  # the place is first's
    assert line.post(one, first).status_code == 200
    assert line.post(two, later).status_code == 200
    assert line.stats()["arrivals"] == ["holder", "first", "later"]


def test_the_line_stays_first_come_first_served_when_turns_come_before_places_free(start_fleet: StartFleet) -> None:
    """The service drains slower than it says (1,000 images a second): both turns come at once, before the place
    frees. The one who came first keeps the place; coming back first must not win it."""
    line = start_fleet(quotas(), reading(images_per_s=1000.0), hold_limit=1, replicas=2)
    one, two = line.gateways
    line.hold(one, line.key("holder", "paid"))
    first, later = line.key("first"), line.key("later")
    assert line_of(line.post(one, first))[0] == 1
    assert line_of(line.post(two, later))[0] == 2
    line.control(gate="open")
    until(lambda: line.stats()["held"] == 0, "the holder is answered")
    assert line.post(two, later).status_code == 503  # the place is first's
    assert line.post(one, first).status_code == 200
    assert line.post(two, later).status_code == 200
    assert line.stats()["arrivals"] == ["holder", "first", "later"]


def test_jobs_start_in_the_order_they_were_accepted_when_the_drain_rate_rises(start_fleet: StartFleet) -> None:
    line = start_fleet(quotas(), reading(), hold_limit=1, replicas=2)
    line.hold(line.gateways[0], line.key("holder", "paid"))
    order = [f"job-{i}" for i in range(6)]
    keys = {who: line.key(who) for who in order}
    line.job(line.gateways[0], keys[order[0]])
    line.advertise(reading(images_per_s=100.0))
    for i, who in enumerate(order[1:]):
        line.job(line.gateways[i % 2], keys[who])
    line.control(gate="open")
    until(lambda: len(line.stats()["arrivals"]) == 1 + len(order), "every job ran")
    assert line.stats()["arrivals"] == ["holder", *order]


# --- jobs: their account's alone ----------------------------------------------------------------------------------

METHODS = ("GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT", "PATCH")


def paths_to(job: str) -> list[str]:
    """Ways of naming a job that a router, a decoder or a Redis key could read as that job."""
    tail = job[4:]
    return [
        f"/v1/images/jobs/{job}",
        f"/v1/images/jobs/{job}/",
        f"/v1/images/jobs/%6Aob_{tail}",
        f"/v1/images/jobs/{job.upper()}",
        f"/v1/images/jobs/..%2f{job}",
        f"/v1/images/jobs/x/../{job}",
        f"/v1/images/./jobs/{job}",
        f"/v1/images/jobs/{job}%00",
        f"/v1/images/jobs/{job}%2F",
        f"/v1/images/jobs/{job}?account=owner",
        f"//v1/images/jobs/{job}",
        f"/v1/images/jobs/{job}*",
        f"/v1/images/jobs/{job[:-1]}*",
        f"/v1/images/jobs/{job[:-1]}?",
        f"/v1/images/jobs/{job}:owner",
        f"/v1/images/jobs/{job}%20",
        f"http://gateway/v1/images/jobs/{job}",
    ]


def test_a_job_is_seen_and_cancelled_by_its_account_alone_whatever_the_path_or_method(start_fleet: StartFleet) -> None:
    """Another account's key (alone, or with a forged account header), or none, gets for the job exactly what it
    gets for a job that does not exist, however the path names it and whatever the method; the job stays queued."""
    line = start_fleet(quotas(), reading(), hold_limit=1, QUOTAGATE_AUTH_FAILURES_PER_MINUTE="0")
    (gateway,) = line.gateways
    line.hold(gateway, line.key("holder", "paid"))
    owner, stranger = line.key("owner"), line.key("stranger")
    location = line.job(gateway, owner).headers["Location"]
    job = location.rsplit("/", 1)[1]
    nobody = "job_" + "".join(reversed(job[4:]))  # same length and alphabet; no job has it
    assert line.read_job(gateway, f"/v1/images/jobs/{nobody}", owner).status_code == 404
    for fields in (
        [("Authorization", f"Bearer {stranger}")],
        [("Authorization", f"Bearer {stranger}"), ("X-Quotagate-Account", "owner")],
        [],
    ):
        for real, fake in zip(paths_to(job), paths_to(nobody), strict=True):
            for method in METHODS:
                seen = exchange(gateway.url, request_bytes(method, real, fields))
                unseen = exchange(gateway.url, request_bytes(method, fake, fields))
                assert 400 <= seen.status < 500, (method, real, fields, seen)
                assert (seen.status, _code(seen)) == (unseen.status, _code(unseen)), (method, real, seen, unseen)
                assert _without(seen.body, job) == _without(unseen.body, nobody), (method, real)
    still = line.read_job(gateway, location, owner)
    assert (still.status_code, still.json()["status"]) == (200, "queued")


def _without(body: bytes, job: str) -> bytes:
    """`body` with the job id, as the paths spell it, taken out."""
    for spelling in (job, job.upper(), job[:-1]):
        body = body.replace(spelling.encode(), b"ID")
    return body


def _code(answer: RawAnswer) -> Any:
    """The OpenAI-shaped error code of an answer, or its body's start where it has none."""
    try:
        return answer.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return answer.body[:40]


def test_odd_prefer_fields_make_a_job_only_when_respond_async_is_asked_for(start_fleet: StartFleet) -> None:
    """RFC 7240: preferences are tokens, case-insensitive, with parameters, in one field or several."""
    line = start_fleet(quotas("line_length: 100000"), reading(), hold_limit=1)
    (gateway,) = line.gateways
    line.hold(gateway, line.key("holder", "paid"))
    asked = [
        ["respond-async"],
        ["RESPOND-ASYNC"],
        ["respond-async, wait=5"],
        ["wait=5, respond-async"],
        ["respond-async;foo"],
        ["respond-async; foo=bar"],
        ["respond-async,respond-async"],
        ["wait=5", "respond-async"],
        ["  respond-async  "],
        ["handling=lenient,respond-async"],
    ]
    not_asked = [
        ["wait=5"],
        ["return=minimal"],
        ['"respond-async"'],
        ["respond-asynchronously"],
        ["x-respond-async"],
        [],
    ]
    for fields, wanted in [(f, True) for f in asked] + [(f, False) for f in not_asked]:
        key = line.key(f"prefer-{uuid.uuid4().hex[:8]}")
        head = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json")]
        head += [("Prefer", value) for value in fields]
        answer = exchange(gateway.url, request_bytes("POST", PATH, head, b'{"prompt": "x"}'))
        if wanted:
            assert answer.status == 202, (fields, answer)
            body = answer.json()
            assert dict(answer.headers)["location"] == f"/v1/images/jobs/{body['id']}"
            assert line.read_job(gateway, f"/v1/images/jobs/{body['id']}", key).json()["status"] == "queued"
        else:
            assert answer.status == 503 and "quotagate-line" in dict(answer.headers), (fields, answer)


def test_an_idempotency_key_never_makes_two_jobs_or_two_images(start_fleet: StartFleet) -> None:
    line = start_fleet(quotas(), reading(), hold_limit=1, replicas=2)
    one, two = line.gateways
    line.hold(one, line.key("holder", "paid"))
    key = line.key("repeater")
    answers = [
        line.post(gateway, key, asynchronous=True, idempotency_key="same-one") for gateway in (one, two, one, two)
    ]
    jobs = {a.json()["id"] for a in answers if a.status_code == 202}
    assert len(jobs) <= 1, [a.text for a in answers]
    line.control(gate="open")
    for job in jobs:
        line.ended(one, f"/v1/images/jobs/{job}", key)
    until(lambda: line.stats()["held"] == 0, "the holder is answered")
    again = [line.post(gateway, key, idempotency_key="same-one") for gateway in (two, one)]  # its place is free now
    assert [a.status_code for a in again] == [200, 200], [a.text for a in again]
    assert line.stats()["arrivals"].count("repeater") == line.used(key) == 1


# --- charging -----------------------------------------------------------------------------------------------------


def test_cancelling_jobs_as_their_turns_come_charges_exactly_the_jobs_that_ran(start_fleet: StartFleet) -> None:
    """Owners cancel their jobs while the places free and the jobs start, through both replicas. Every DELETE
    tells the truth: `cancelled` (never run, never charged), 409 (it had started), or the job's end (done or failed)
    with its result given once more; never a job still queued or running that it then lets run."""
    line = start_fleet(quotas(), reading(slots=3, images_per_s=50.0), hold_limit=3, replicas=2)
    holder = line.key("holder", "paid")
    line.hold(line.gateways[0], holder, places=3)
    keys = {f"racer-{i}": line.key(f"racer-{i}") for i in range(24)}
    jobs = {who: line.job(line.gateways[i % 2], key).headers["Location"] for i, (who, key) in enumerate(keys.items())}

    def cancel(index: int) -> httpx.Response:
        who = list(jobs)[index]
        time.sleep(0.004 * index)  # spread over the jobs' starts
        return line.client.delete(f"{line.gateways[index % 2].url}{jobs[who]}", headers=auth(keys[who]))

    line.control(gate="open")
    cancels = dict(zip(jobs, _all_at_once(cancel, list(range(len(jobs)))), strict=True))
    for who, location in jobs.items():
        told = cancels[who]
        assert told.status_code in (200, 409), (who, told.text)
        cancelled = told.status_code == 200 and told.json()["status"] == "cancelled"
        if told.status_code == 200 and not cancelled:
            assert told.json()["status"] in ("done", "failed"), (who, told.text)
        if not cancelled:
            until(partial(_arrived, line, who), f"{who}'s job ran")
        if told.status_code == 409:
            line.ended(line.gateways[0], location, keys[who])
        ran = line.stats()["arrivals"].count(who)
        assert ran == line.used(keys[who]) == (0 if cancelled else 1), (who, told.text)


def _arrived(line: Fleet, account: str) -> bool:
    return account in line.stats()["arrivals"]


def fail_by_crash(line: Fleet) -> None:
    line.control(mode="fail")


def fail_by_refusal(line: Fleet) -> None:
    line.control(hold_limit=0)  # full, whatever it advertises


def fail_by_size(line: Fleet) -> None:
    line.control(image_bytes=4096)  # past QUOTAGATE_JOB_RESULT_BYTES


@pytest.mark.parametrize("failure", [fail_by_crash, fail_by_refusal, fail_by_size], ids=lambda f: f.__name__)
def test_a_job_that_fails_at_the_backend_is_not_charged(start_fleet: StartFleet, failure: Any) -> None:
    line = start_fleet(quotas(), reading(), hold_limit=1, QUOTAGATE_JOB_RESULT_BYTES="1024")
    (gateway,) = line.gateways
    line.hold(gateway, line.key("holder", "paid"))
    owner = line.key("owner")
    location = line.job(gateway, owner).headers["Location"]
    failure(line)
    line.control(gate="open")
    ended = line.ended(gateway, location, owner)
    assert ended["status"] == "failed" and "result" not in ended, ended
    assert line.used(owner) == 0


def test_a_job_past_the_quota_by_its_turn_fails_uncharged_and_the_one_within_is_charged_once(
    start_fleet: StartFleet,
) -> None:
    line = start_fleet(quotas(), reading(slots=4, images_per_s=1.0), hold_limit=4)
    (gateway,) = line.gateways
    line.hold(gateway, line.key("holder", "paid"), places=4)
    owner = line.key("owner")
    assert line.post(gateway, owner, n=10, asynchronous=True).status_code == 429  # past the day, at once
    jobs = [line.job(gateway, owner, 2).headers["Location"] for _ in range(2)]  # each fits alone: 2 of 3
    line.control(gate="open")
    done, failed = sorted((line.ended(gateway, job, owner) for job in jobs), key=lambda j: str(j["status"]))
    assert (done["status"], len(done["result"]["data"])) == ("done", 2)
    assert failed["status"] == "failed" and "result" not in failed
    assert line.used(owner) == 2 == line.stats()["arrivals"].count("owner") * 2


def test_deleting_a_done_job_neither_refunds_nor_charges_again(start_fleet: StartFleet) -> None:
    line = start_fleet(quotas(), reading(), hold_limit=1, replicas=2)
    one, two = line.gateways
    line.hold(one, line.key("holder", "paid"))
    owner = line.key("owner")
    location = line.job(one, owner).headers["Location"]
    line.control(gate="open")
    assert line.ended(two, location, owner)["status"] == "done"
    assert line.used(owner) == 1
    deleted = [line.client.delete(f"{g.url}{location}", headers=auth(owner)) for g in (one, two, one)]
    assert [d.status_code for d in deleted][1:] == [404, 404], [d.text for d in deleted]
    assert line.read_job(two, location, owner).status_code == 404
    assert line.used(owner) == 1 == line.stats()["arrivals"].count("owner")


def test_a_result_is_kept_no_longer_than_its_lifetime(start_fleet: StartFleet) -> None:
    line = start_fleet(quotas(), reading(), hold_limit=1, QUOTAGATE_JOB_RESULT_TTL="1")
    (gateway,) = line.gateways
    line.hold(gateway, line.key("holder", "paid"))
    owner = line.key("owner")
    location = line.job(gateway, owner).headers["Location"]
    line.control(gate="open")
    until(lambda: line.read_job(gateway, location, owner).status_code == 404, "the result is forgotten")
    assert line.used(owner) == 1 == line.stats()["arrivals"].count("owner")


def test_a_job_whose_replica_dies_while_it_runs_ends_and_is_charged_only_for_an_image_delivered(
    start_fleet: StartFleet,
) -> None:
    """Its replica is SIGKILLed while the image service holds the job's request; the service drops the request
    (its client is gone). The job must not stay `running` for ever with its image charged: it runs again and is
    done, charged once, or it fails and is not charged."""
    line = start_fleet(quotas(), reading(), hold_limit=1, QUOTAGATE_PLACE_TTL="2")
    (doomed,) = line.gateways
    line.hold(doomed, line.key("holder", "paid"))
    owner = line.key("owner")
    location = line.job(doomed, owner).headers["Location"]
    line.control(release=1)  # the holder is answered; the job takes the place and is held in its turn
    until(lambda: line.stats()["arrivals"] == ["holder", "owner"] and line.stats()["held"] == 1, "the job runs")
    survivor = line.start_gateway()
    doomed.kill()
    until(lambda: line.stats()["held"] == 0, "the service dropped the dead replica's request")
    line.control(gate="open")
    ended = line.ended(survivor, location, owner)
    delivered = ended["status"] == "done"
    assert line.used(owner) == (1 if delivered else 0), ended
    if delivered:
        assert len(ended["result"]["data"]) == 1


def test_a_queued_job_outlives_the_whole_fleet(start_fleet: StartFleet) -> None:
    line = start_fleet(quotas(), reading(), hold_limit=1)
    (gone,) = line.gateways
    line.hold(gone, line.key("holder", "paid"))
    owner = line.key("owner")
    location = line.job(gone, owner).headers["Location"]
    gone.kill()
    line.control(gate="open")
    fresh = line.start_gateway()
    ended = line.ended(fresh, location, owner)
    assert ended["status"] == "done" and line.used(owner) == 1 == line.stats()["arrivals"].count("owner")


# --- capacity: what the image service advertises, however absurd -------------------------------------------------

NONSENSE = {
    "negative": reading(slots=-5),
    "past any GPU": reading(slots=10**18),
    "a queue past 2**64": reading(queue_images=2**70),
    "a fraction": reading(slots=2.5),
    "NaN": reading().replace('"slots": 1', '"slots": NaN'),
    "infinite": reading().replace('"slots": 1', '"slots": 1e999'),
    "a string": reading(slots="8"),
    "true": reading(slots=True),
    "negative counts": reading(queued_images=-100, running_images=-100),
    "a negative rate": reading(images_per_s=-3),
    "not JSON": "<html>busy</html>",
    "a list": "[1, 2]",
    "empty": "",
}


def test_a_service_advertising_nonsense_is_sent_nothing_and_its_clients_are_told_when_to_return(
    start_fleet: StartFleet,
) -> None:
    line = start_fleet(quotas(), reading(), hold_limit=100)
    (gateway,) = line.gateways
    paid = line.key("paid", "paid")
    for name, text in NONSENSE.items():
        line.control(advertise=text)
        until(lambda: gateway.metric("quotagate_fleet_capacity_images", pool="diffusion") == 0, f"{name} read")
        answers = _all_at_once(lambda _: line.post(gateway, paid), list(range(4)))
        assert all(a.status_code == 503 and int(a.headers["Retry-After"]) >= 1 for a in answers), name
        assert line.stats()["arrivals"] == [], name
        line.advertise(reading())


def test_a_service_that_advertises_more_than_it_holds_charges_only_what_it_made(start_fleet: StartFleet) -> None:
    line = start_fleet(quotas(), reading(slots=100), hold_limit=2, replicas=2)
    paid = line.key("paid", "paid")
    line.control(gate="closed")
    answers: list[httpx.Response] = []

    def send(index: int) -> None:
        answers.append(line.post(line.gateways[index % 2], paid))

    rush = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for thread in rush:
        thread.start()
    until(lambda: line.stats()["held"] == 2 and len(answers) == 10, "the liar held 2; the others were answered")
    line.control(gate="open")
    for thread in rush:
        thread.join()
    assert sorted(a.status_code for a in answers) == [200] * 2 + [503] * 10
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 503)
    assert line.used(paid) == line.stats()["answered"] == 2
    assert line.stats()["most_held"] == 2
