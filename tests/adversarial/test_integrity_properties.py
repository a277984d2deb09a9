"""Quota integrity against a client who tries everything at once: a stateful property test on the whole stack.

A fresh free account (3 images a day) mixes normal requests, replays of an Idempotency-Key with the
same body and with another, hang-ups at every point of the exchange, stalled bodies, credentials in
a chunked body's trailer, and concurrent bursts, against a real gateway, the real backend on the tiny
diffusers model and a real redis-server. After every step:

- the whole images the client holds are at most the day's 3, and at most the images charged and not
  refunded (a replay is the same images again: images are counted once each);
- the backend made at most the images charged and not refunded, plus those refunded because the
  backend or the path to it failed.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, rule, run_state_machine_as_test

from .ledger import Ledger, read_ledger, settled
from .mix import Client, Leaving, Received, generation
from .stack import DAILY_IMAGES, Stack, running_stack

pytestmark = pytest.mark.slow

PLAN = "free"
RUNS = settings(
    max_examples=15, stateful_step_count=12, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
images = st.integers(1, 2)


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(redis_url, tmp_path) as running:
        yield running


class AdversarialAccount(RuleBasedStateMachine):
    """One free account's day of adversarial moves; the stack is shared by every example."""

    stack: Stack
    keys = Bundle("keys")  # (Idempotency-Key, the body first sent with it)

    def __init__(self) -> None:
        super().__init__()
        account = f"adversary-{uuid.uuid4().hex[:12]}"
        self.client = Client(self.stack.gateway_url, self.stack.new_key(account))
        self.prompts = (f"{account} prompt {i}" for i in itertools.count())
        self.delivered: set[str] = set()  # every whole image received, each once
        self.requests = 0  # requests with the key in their header section: each one the gateway ends and counts
        self.start = self.ledger()

    def ledger(self) -> Ledger:
        return read_ledger(self.stack.gateway_url, self.stack.backend_url, PLAN)

    def body(self, n: int) -> bytes:
        return generation(next(self.prompts), n)

    def took(self, *answers: Received) -> None:
        for answer in answers:
            self.delivered.update(answer.images)

    def keyed(self, idempotency_key: str | None, body: bytes) -> object:
        return multiple() if idempotency_key is None else (idempotency_key, body)

    @rule(target=keys, n=images, with_key=st.booleans())
    def request(self, n: int, with_key: bool) -> object:
        body, idempotency_key = self.body(n), uuid.uuid4().hex if with_key else None
        self.requests += 1
        self.took(self.client.send(body, idempotency_key))
        return self.keyed(idempotency_key, body)

    @rule(entry=keys)
    def replay(self, entry: tuple[str, bytes]) -> None:
        idempotency_key, body = entry
        self.requests += 1
        self.took(self.client.send(body, idempotency_key))

    @rule(entry=keys, n=images)
    def replay_another_body(self, entry: tuple[str, bytes], n: int) -> None:
        self.requests += 1
        self.took(self.client.send(self.body(n), entry[0]))

    @rule(
        target=keys,
        n=images,
        at=st.sampled_from(["after_head", "mid_body", "after_body"]),
        with_key=st.booleans(),
    )
    def hang_up(self, n: int, at: Leaving, with_key: bool) -> object:
        body, idempotency_key = self.body(n), uuid.uuid4().hex if with_key else None
        self.requests += 1
        self.took(self.client.leave(body, at, idempotency_key))
        return self.keyed(idempotency_key, body)

    @rule(target=keys, n=images, length=st.integers(1, 40_000), with_key=st.booleans())
    def hang_up_mid_answer(self, n: int, length: int, with_key: bool) -> object:
        body, idempotency_key = self.body(n), uuid.uuid4().hex if with_key else None
        self.requests += 1
        self.took(self.client.read_part(body, length, idempotency_key))
        return self.keyed(idempotency_key, body)

    @rule(n=images, part=st.floats(0, 1, exclude_max=True), then=st.sampled_from(["close", "wait"]))
    def stalled_body(self, n: int, part: float, then: Literal["close", "wait"]) -> None:
        body = self.body(n)
        self.requests += 1
        self.took(self.client.stall(body, int(len(body) * part), then))

    @rule(n=images, key_in_head=st.booleans())
    def key_in_a_trailer(self, n: int, key_in_head: bool) -> None:
        answer = self.client.chunked(self.body(n), key_in_head=key_in_head)
        if not key_in_head:
            assert answer.status is not None and not 200 <= answer.status < 300, (
                f"a key sent only in a trailer was let in: {answer.status}"
            )
        self.took(answer)

    @rule(size=st.integers(2, 4), n=images, shared_key=st.booleans())
    def burst(self, size: int, n: int, shared_key: bool) -> None:
        if shared_key:  # the same request, with the same key, several times at once
            shared = (self.body(n), uuid.uuid4().hex)
            requests: list[tuple[bytes, str | None]] = [shared] * size
        else:
            requests = [(self.body(n), None) for _ in range(size)]
        self.requests += size
        self.took(*self.client.burst(requests))

    @invariant()
    def integrity(self) -> None:
        self.check(self.ledger().since(self.start))

    def check(self, change: Ledger) -> None:
        delivered = len(self.delivered)
        assert delivered <= DAILY_IMAGES, f"{delivered} whole images received in a day of {DAILY_IMAGES}"
        assert delivered <= change.kept, f"{delivered} whole images received, {change.kept} charged: {change}"
        assert change.made <= change.made_bound, (
            f"the backend made {change.made} images, charged and failed only {change.made_bound}: {change}"
        )

    def teardown(self) -> None:
        # Every request the client left is ended by now, and its charge settled: the final account.
        self.check(settled(self.stack.gateway_url, self.stack.backend_url, PLAN, self.start, self.requests))


def test_no_mix_of_moves_gets_an_image_uncharged_or_makes_one_unaccounted(stack: Stack) -> None:
    AdversarialAccount.stack = stack
    run_state_machine_as_test(AdversarialAccount, settings=RUNS)
