"""Two versions of the quota engine side by side: client CPU per decision at 64 concurrent, in alternating runs.

Run with `.venv/bin/python bench/engine_ab.py OLD [NEW] [--rounds 8]`, where OLD and NEW are git
revisions (NEW defaults to `.`, the working tree).

Each revision is checked out in a temporary git worktree. One redis-server runs on the first core;
each round runs `Engine.decide` from one process per revision on the second core, the order
alternating, 20,000 decisions of 64 concurrent workers each, with the engine's package imported from
that revision's tree and every other package from this venv. The median of each revision's client
CPU per decision (time.process_time) is printed, and their ratio: what a change to the engine costs
or saves, measured where the machine's noise hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ab import checked_out

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis as redis_py  # noqa: E402

from gateway.ops.embedded_redis import RedisServer  # noqa: E402
from tests.ports import free_port  # noqa: E402

# Run inside each revision's tree: the engine from there, decisions at 64 concurrent, CPU per decision.
# It leaves without closing the engine: closing is no part of the figure, and older engines close
# through redis-py internals that newer redis-py releases changed.
PROBE = """
import asyncio, json, os, sys, time
from zoneinfo import ZoneInfo
from limits import Bucket, DailyQuota, Engine, LimitSet, connect

PRO = LimitSet(
    buckets=(Bucket("pro-rate", "rate", rate=1_000_000, period=60, burst=1_000_000),),
    quotas=(DailyQuota("pro-daily", "daily", limit=None, timezone=ZoneInfo("UTC")),),
)

async def main(url, decisions, workers):
    engine = Engine(connect(url, timeout=10.0))
    await engine.decide("warm-up", PRO, 1)
    accounts = [f"bench-{i % 1000}" for i in range(decisions)]

    async def worker(w):
        for account in accounts[w::workers]:
            await engine.decide(account, PRO, 1)

    cpu = time.process_time()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    print(json.dumps({"client_cpu_us": (time.process_time() - cpu) * 1e6 / decisions}), flush=True)
    os._exit(0)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def probe(tree: Path, url: str, core: int | None, decisions: int, workers: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-c", PROBE, url, str(decisions), str(workers)]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    out = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=300, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["client_cpu_us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new", nargs="?", default=".")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=64)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    runs: dict[str, list[float]] = {args.old: [], args.new: []}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qg-engine-ab-")))
        order = [
            (args.old, stack.enter_context(checked_out(args.old, tmp / "old"))),
            (args.new, stack.enter_context(checked_out(args.new, tmp / "new"))),
        ]
        port = free_port()
        server = RedisServer(tmp / "redis", port=port)
        server.start()
        stack.callback(server.stop)
        with redis_py.Redis(port=port) as admin:
            if len(cores) > 1:
                os.sched_setaffinity(int(admin.info("server")["process_id"]), {cores[0]})
        url = f"redis://127.0.0.1:{port}/0"
        client_core = cores[1] if len(cores) > 1 else None
        for round_ in range(args.rounds):
            for name, tree in order if round_ % 2 == 0 else reversed(order):
                runs[name].append(probe(tree, url, client_core, args.decisions, args.workers))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    print(f"client CPU µs per decision, {args.workers} concurrent, median of {args.rounds} alternating runs")
    for name, values in runs.items():
        print(f"  {name}: {medians[name]:.1f}  (runs: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  {args.new} / {args.old}: {medians[args.new] / medians[args.old]:.2f}")


if __name__ == "__main__":
    main()
