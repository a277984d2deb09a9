"""The adversarial mix at scale: do free accounts that try everything get an image uncharged, or one unaccounted?

Run with `.venv/bin/python bench/adversarial.py [--accounts 800 --operations 16 --parallel 8 --seed 1]`.
Writes bench/results/adversarial.json. About 70 s on two cores.

The whole stack runs for real: redis-server, the backend on the tiny diffusers model (64x64, two
steps) and `quotagate serve` before it, with the free plan of tests/adversarial/stack.py (3 images a
day, 2 requests of one account at once, a 0.5 s body deadline). ACCOUNTS new free accounts, PARALLEL
at a time, each make OPERATIONS moves drawn at random from the mix of tests/adversarial/mix.py:
normal requests, Idempotency-Key replays with the same body and another, hang-ups after the head,
mid-body, after the body and mid-answer, stalled bodies (closed, or left to the deadline), a key sent
only in a chunked body's trailer, and bursts of 2 to 4 requests at once.

It reports the images the clients hold whole (an image received twice, by a replay, counts once), the
images charged and refunded by reason (gateway), the images the backend made, and two figures:

  delivered - charged                      at most 0; below 0 by the images of answers the clients
                                           abandoned after the backend began them (charged by rule)
  made - charged - refunded for failures   0: every image the backend made is paid for, or was
                                           refunded because the backend or the path to it failed
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Run as a script, bench/ comes first on sys.path; the packages live in the repository root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.ops.embedded_redis import RedisServer  # noqa: E402
from tests.adversarial.ledger import FAILURE, read_ledger, settled  # noqa: E402
from tests.adversarial.mix import Client, Leaving, Received, generation  # noqa: E402
from tests.adversarial.stack import DAILY_IMAGES, QUOTAS, Stack, running_stack  # noqa: E402
from tests.ports import free_port  # noqa: E402

RESULTS = BENCH / "results"
PLAN = "free"
MOVES = (
    "request",
    "keyed_request",
    "replay",
    "replay_another_body",
    "hang_up_after_head",
    "hang_up_mid_body",
    "hang_up_after_body",
    "hang_up_mid_answer",
    "stall_then_close",
    "stall_past_deadline",
    "key_in_a_trailer",
    "burst",
    "burst_one_key",
)

LEAVING: dict[str, Leaving] = {
    "hang_up_after_head": "after_head",
    "hang_up_mid_body": "mid_body",
    "hang_up_after_body": "after_body",
}


@dataclass
class Account:
    """One adversarial account: its moves, and what it received."""

    client: Client
    rng: random.Random
    account: str
    delivered: set[str] = field(default_factory=set)
    requests: int = 0  # requests with the key in their header section (the gateway counts each under the plan)
    moves: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    keys: list[tuple[str, bytes]] = field(default_factory=list)
    prompts: int = 0

    def body(self) -> bytes:
        self.prompts += 1
        return generation(f"{self.account} prompt {self.prompts}", self.rng.randint(1, 2))

    def took(self, *answers: Received) -> None:
        for answer in answers:
            self.delivered.update(answer.images)
            self.statuses[str(answer.status) if answer.status is not None else "left"] += 1

    def keyed(self) -> tuple[str, bytes]:
        entry = (uuid.uuid4().hex, self.body())
        self.keys.append(entry)
        return entry

    def maybe_keyed(self) -> tuple[str | None, bytes]:
        return self.keyed() if self.rng.random() < 0.5 else (None, self.body())

    def move(self) -> None:
        move = self.rng.choice(MOVES)
        if move.startswith("replay") and not self.keys:
            move = "keyed_request"
        self.moves[move] += 1
        self.requests += 0 if move == "key_in_a_trailer" else 1
        client, rng = self.client, self.rng
        match move:
            case "request":
                self.took(client.send(self.body()))
            case "keyed_request" | "replay":
                key, body = self.keyed() if move == "keyed_request" else rng.choice(self.keys)
                self.took(client.send(body, key))
            case "replay_another_body":
                self.took(client.send(self.body(), rng.choice(self.keys)[0]))
            case "hang_up_after_head" | "hang_up_mid_body" | "hang_up_after_body":
                maybe_key, body = self.maybe_keyed()
                self.took(client.leave(body, LEAVING[move], maybe_key))
            case "hang_up_mid_answer":
                maybe_key, body = self.maybe_keyed()
                self.took(client.read_part(body, rng.randint(1, 40_000), maybe_key))
            case "stall_then_close" | "stall_past_deadline":
                body = self.body()
                self.took(
                    client.stall(body, rng.randrange(len(body)), "close" if move == "stall_then_close" else "wait")
                )
            case "key_in_a_trailer":
                self.took(client.chunked(self.body(), key_in_head=False))
            case "burst" | "burst_one_key":
                size = rng.randint(2, 4)
                self.requests += size - 1
                one = (self.body(), uuid.uuid4().hex)
                requests = [one] * size if move == "burst_one_key" else [(self.body(), None) for _ in range(size)]
                self.took(*client.burst(requests))


def play(stack: Stack, index: int, operations: int, seed: int) -> Account:
    account = f"adversary-{index}-{uuid.uuid4().hex[:8]}"
    rng = random.Random(seed * 1_000_003 + index)
    player = Account(Client(stack.gateway_url, stack.new_key(account)), rng, account)
    for _ in range(operations):
        player.move()
    return player


def run(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    start = read_ledger(stack.gateway_url, stack.backend_url, PLAN)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        players = list(pool.map(lambda i: play(stack, i, args.operations, args.seed), range(args.accounts)))
    moves_s = time.perf_counter() - started
    requests = sum(player.requests for player in players)
    change = settled(stack.gateway_url, stack.backend_url, PLAN, start, requests)
    delivered = sum(len(player.delivered) for player in players)
    failures = change.refunded.get(FAILURE, 0.0)
    return {
        "accounts": args.accounts,
        "operations_per_account": args.operations,
        "parallel": args.parallel,
        "seed": args.seed,
        "quotas": QUOTAS,
        "moves": dict(sum((player.moves for player in players), Counter())),
        "answers": dict(sum((player.statuses for player in players), Counter())),
        "requests_ended_by_gateway": change.ended,
        "images_delivered": delivered,
        "most_images_one_account_received": max(len(player.delivered) for player in players),
        "daily_images": DAILY_IMAGES,
        "images_charged_at_admission": change.charged,
        "images_refunded": change.refunded,
        "images_charged": change.kept,
        "backend_images_made": change.made,
        "delivered_minus_charged": delivered - change.kept,
        "backend_made_minus_charged_minus_refunded_for_failures": change.made - change.kept - failures,
        "moves_s": round(moves_s, 1),
    }


def table(results: dict[str, Any]) -> str:
    refunds = ", ".join(f"{reason} {value:g}" for reason, value in sorted(results["images_refunded"].items()))
    lines = [
        f"{results['accounts']} free accounts x {results['operations_per_account']} moves, "
        f"{results['parallel']} at a time, seed {results['seed']}: {results['moves_s']} s of moves",
        f"moves: {dict(sorted(results['moves'].items()))}",
        f"answers: {dict(sorted(results['answers'].items()))}",
        "",
        f"images delivered (whole, each once)      {results['images_delivered']:g}"
        f"   (most to one account: {results['most_images_one_account_received']} of {results['daily_images']})",
        f"images charged at admission              {results['images_charged_at_admission']:g}",
        f"images refunded                          {sum(results['images_refunded'].values()):g}   ({refunds})",
        f"images charged (admitted - refunded)     {results['images_charged']:g}",
        f"images the backend made                  {results['backend_images_made']:g}",
        "",
        f"delivered - charged                      {results['delivered_minus_charged']:g}",
        "made - charged - refunded for failures   "
        f"{results['backend_made_minus_charged_minus_refunded_for_failures']:g}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=800, help="free accounts (default 800)")
    parser.add_argument("--operations", type=int, default=16, help="moves of each account (default 16)")
    parser.add_argument("--parallel", type=int, default=8, help="accounts playing at once (default 8)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qg-adversarial-") as tmp:
        redis = RedisServer(Path(tmp) / "redis", port=free_port())
        redis.start()
        try:
            with running_stack(redis.url, Path(tmp)) as stack:
                results = run(stack, args)
        finally:
            redis.stop()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adversarial.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n{results['wall_s']:.0f} s in all; results in {RESULTS}/adversarial.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
