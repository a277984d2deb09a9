"""Launch day, compressed, against two revisions of the gateway on the same load: a flood of new free accounts
while paid customers keep working, and a gateway replica added and one killed halfway.

Run with `make bench` or `.venv/bin/python bench/surge.py [--accounts 6000 --window 120] [--quick]`.
Writes bench/results/surge.json and surge.md.

Each revision runs in turn on a stack of its own, started fresh: redis-server, SERVICES image services of
fixed capacity (bench/servers.py:capacity_app: SLOTS images at a time, SERVICE_MS each ± JITTER, QUEUE more
waiting, advertised at GET /v1/capacity with the drain rate it measures; it holds whatever it is sent, so
that what a gateway sends past its capacity shows), and REPLICAS gateway replicas (`quotagate serve`, one
worker each) of the revision, all on the first core. The load generator, the services and redis-server
share the second. At a third of the window one more replica starts; at two thirds one of the first is
SIGKILLed and its clients move to the others.

  today     the working tree (`--today`): the fleet's capacity in Redis, learned from the services, a line
            per plan whose 503s tell each request its turn, async jobs (`Prefer: respond-async`);
  previous  `--previous` (8331eaa): each process sheds on its own `max_in_flight` (by default the fleet's
            capacity ÷ REPLICAS, as an operator would have split it) with a random Retry-After of 1-5 s.

The load (bench/surge_load.py): PAID_RPS paid requests a second, open loop, BASELINE seconds alone (the
unloaded p99), then throughout; ACCOUNTS free accounts arriving evenly over WINDOW seconds, each after
IMAGES images one after the other, half of them honouring Retry-After, half using async jobs (which, on a
revision without jobs, are Retry-After clients too). The figures and their definitions: bench/surge_figures.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Run as a script, bench/ comes first on sys.path; the packages live in the repository root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ab import checked_out  # noqa: E402
from overhead import RESULTS, SECRET, cores  # noqa: E402
from surge_figures import SAMPLE_EVERY_S, Sample, Span, figures, table  # noqa: E402
from surge_load import Gateways, Tally, free_surge, paid_load  # noqa: E402
from surge_stack import ServiceSettings, Stack  # noqa: E402

from gateway.admission.identity import KeyStore  # noqa: E402
from gateway.upstream.client import Origin, UpstreamClient  # noqa: E402
from limits import Engine, Fleet, LinePlan, PoolRules, connect  # noqa: E402

PREVIOUS = "8331eaa"  # the last revision that shed per process, before the fleet's shared capacity


async def make_keys(redis_url: str, plan: str, count: int) -> list[str]:
    redis = connect(redis_url, timeout=30.0)  # patient: the machine may be busy, and this is set-up
    store = KeyStore(redis, SECRET.encode())
    keys: list[str] = []
    try:
        for start in range(0, count, 100):
            batch = range(start, min(start + 100, count))
            keys += await asyncio.gather(*(store.create_key(f"{plan}-{i}", plan) for i in batch))
    finally:
        await redis.aclose()
    return keys


async def service_stats(client: UpstreamClient, url: str, *, jobs: bool = False) -> dict[str, Any]:
    answer = await client.send(Origin.parse(url), "GET", "/bench/stats" + ("?jobs=1" if jobs else ""), (), b"")
    try:
        return json.loads(await answer.read())  # type: ignore[no-any-return]
    finally:
        answer.release()


async def sample(client: UpstreamClient, stack: Stack, tally: Tally, samples: list[Sample], stop: asyncio.Event,
                 fleet: Callable[[], Awaitable[tuple[float, ...]]] | None) -> None:  # fmt: skip
    """Every SAMPLE_EVERY_S: what each service holds and its busy seconds, the images waiting at the clients, and
    (where the gateway keeps one) the fleet's shared view."""
    while not stop.is_set():
        waiting, at = tally.waiting, tally.now()
        stats = await asyncio.gather(*(service_stats(client, s.url) for s in stack.services))
        view = await fleet() if fleet is not None else ()
        held, busy = tuple(s["held"] for s in stats), tuple(s["busy_s"] for s in stats)
        samples.append(Sample(at, waiting, held, busy, sum(s["made"] for s in stats), view))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


@contextlib.asynccontextmanager
async def fleet_view(redis_url: str, reserved: float) -> AsyncIterator[Callable[[], Awaitable[tuple[float, ...]]]]:
    """Reads the fleet's shared view of the pool as the gateway keeps it in Redis: (capacity, drain rate, images
    held, paid line, free line, seconds a newcomer to the free line would wait)."""
    redis = connect(redis_url, timeout=5.0)
    fleet = Fleet(Engine(redis))
    plans = (LinePlan("paid", 10, False), LinePlan("free", 0, True))
    rules = PoolRules(plans=plans, reserved_for_paid=reserved, ceiling=None, line_cap=0, grace=0.0)

    async def read() -> tuple[float, ...]:
        state = await fleet.state("diffusion", rules)
        free, paid = state.plans["free"], state.plans["paid"]
        return (state.capacity, state.images_per_s, state.held, paid.line, free.line, round(free.wait, 2))

    try:
        yield read
    finally:
        await redis.aclose()


async def replicas_come_and_go(stack: Stack, gateways: Gateways, tally: Tally, surge_start: float, window: float,
                               events: list[dict[str, Any]]) -> None:  # fmt: skip
    """At a third of the window one replica more; at two thirds the second replica is SIGKILLed."""
    await asyncio.sleep(max(0.0, surge_start + window / 3 - tally.now()))
    asked = tally.now()
    added = await stack.add_replica_async()
    gateways.add(added.url)
    events.append({"event": f"{added.name} added", "asked_at_s": asked, "at_s": tally.now()})
    await asyncio.sleep(max(0.0, surge_start + 2 * window / 3 - tally.now()))
    victim = stack.replicas[1]
    stack.kill(victim)
    gateways.remove(victim.url)
    events.append({"event": f"{victim.name} SIGKILLed", "at_s": tally.now()})


async def simulate(args: argparse.Namespace, stack: Stack, shared_view: bool) -> dict[str, Any]:
    paid_keys = await make_keys(stack.redis.url, "paid", args.paid_accounts)
    free_keys = await make_keys(stack.redis.url, "free", args.accounts)
    # What set-up made lives to the end: out of the collector's scans, whose pauses would count as latency.
    gc.collect()
    gc.freeze()
    client = UpstreamClient(connect_timeout=10.0, read_timeout=120.0)
    gateways = Gateways([replica.url for replica in stack.replicas])
    samples: list[Sample] = []
    events: list[dict[str, Any]] = []
    cpu_before, load_before, machine_before, wall_before = stack.cpu(), _own_cpu(), _machine_cpu(), time.monotonic()
    async with contextlib.AsyncExitStack() as closing:
        view = await closing.enter_async_context(fleet_view(stack.redis.url, args.reserved)) if shared_view else None
        closing.push_async_callback(client.close)
        tally = Tally()
        started_wall = time.time()
        stop_sampling, stop_paid = asyncio.Event(), asyncio.Event()
        sampler = asyncio.create_task(sample(client, stack, tally, samples, stop_sampling, view))
        paid = asyncio.create_task(paid_load(client, gateways, paid_keys, args.paid_rps, stop_paid, tally))
        await asyncio.sleep(args.baseline)
        surge_start = tally.now()
        changes = asyncio.create_task(replicas_come_and_go(stack, gateways, tally, surge_start, args.window, events))
        surge = asyncio.create_task(free_surge(client, gateways, free_keys, args.window, args.images, tally))
        done, _ = await asyncio.wait([surge], timeout=args.deadline)
        if not done:
            surge.cancel()
            events.append({"event": f"deadline: the free accounts still trying after {args.deadline:.0f} s stopped",
                           "at_s": tally.now()})  # fmt: skip
        with contextlib.suppress(asyncio.CancelledError):
            await surge
        surge_end = tally.now()
        await changes
        await asyncio.sleep(args.tail)
        stop_paid.set()
        await paid
        stop_sampling.set()
        await sampler
        wall = time.monotonic() - wall_before
        cpu_after, load_after, machine_after = stack.cpu(), _own_cpu(), _machine_cpu()
        services = [await service_stats(client, s.url, jobs=True) for s in stack.services]
    span = Span(surge_start, surge_end)
    cpu = {name: (cpu_after[name] - cpu_before[name]) / wall for name in cpu_after}
    cpu["load generator"] = (load_after - load_before) / wall
    # What the machine's other tenants took meanwhile: a bench on a shared machine reads this before its figures.
    cpu["everything else on the machine"] = (machine_after - machine_before) / wall - sum(cpu.values())
    results = {
        "figures": figures(tally, samples, services, span, surge_start),
        "events": events,
        "baseline_s": args.baseline,
        "surge_start_s": surge_start,
        "surge_end_s": surge_end,
        "started_wall": started_wall,
        "cpu_share": cpu,
        "timeline": [
            {"t": round(s.t, 2), "waiting": s.waiting, "held": list(s.held), "made": s.made, "fleet": list(s.fleet)}
            for s in samples[:: round(1 / SAMPLE_EVERY_S)]
        ],
        "gateway_logs": stack.gateway_log_tail(),
    }
    for service in services:
        service.pop("jobs", None)
    results["services"] = services
    return results


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _machine_cpu() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_revision(args: argparse.Namespace, name: str, revision: str, tree: Path, pinning: tuple[str, str],
                 settings: ServiceSettings) -> dict[str, Any]:  # fmt: skip
    """One revision's run on a stack of its own."""
    capacity = settings.capacity * args.services
    if name == "today":
        pool: dict[str, int | float] = {"reserved_for_paid": args.reserved}
        env = {"QUOTAGATE_CAPACITY_POLL": str(args.capacity_poll)}
        if args.place_ttl is not None:
            env["QUOTAGATE_PLACE_TTL"] = str(args.place_ttl)
    else:
        pool = {"max_in_flight": args.max_in_flight or math.ceil(capacity / args.replicas),
                "reserved_for_paid": args.reserved}  # fmt: skip
        env = {}
    print(f"==> {name} ({revision}): pools.diffusion {pool}", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"qg-surge-{name}-") as tmp:
        stack = Stack(Path(tmp), tree, pinning, env)
        try:
            stack.start(settings, args.services, pool, args.replicas)
            results = uvloop.run(simulate(args, stack, shared_view=name == "today"))
        finally:
            stack.stop()
    results |= {"revision": revision, "pool": pool, "gateway_env": env}
    return results


def git(*arguments: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *arguments], capture_output=True, text=True, check=True).stdout


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "unknown CPU"
    )  # fmt: skip
    return f"{os.cpu_count()} cores ({model}), Python {sys.version.split()[0]}"


def describe(args: argparse.Namespace, settings: ServiceSettings, results: dict[str, Any]) -> str:
    """The table and what it was measured on."""
    today, previous = results.get("today"), results.get("previous")
    capacity = settings.capacity * args.services
    lines = [
        f"{results['date']}; {results['machine']}; commit `{results['commit']}`; `{results['command']}`; "
        f"{results['wall_s']:.0f} s.",
        "",
        table(today, previous),
        "",
        "How each figure is taken (bench/surge_figures.py): (2) counts the seconds in which at least one free image "
        "waited (its client told to come back, or its job queued); (4) counts requests for images (POSTs), the "
        "target's `requests sent`; an async client also GETs its job at each Retry-After, given beside; (5) runs "
        "from the 202 to the job's request reaching a service, the ETA counted as at least 1 s as the gateway's "
        "`quotagate_job_eta_error` does; (6) an account's wait is the seconds from first asking for each of its "
        "images to having it, summed; accounts are compared with those that arrived in the same second (a line "
        "served in order makes later arrivals wait longer), the index over all accounts at once beside it.",
        "",
        f"Load: {args.accounts:,} free accounts over {args.window:.0f} s, {args.images} images each (half honour "
        f"Retry-After, half use async jobs), {args.paid_rps:.0f} paid requests/s ({args.baseline:.0f} s alone "
        f"first). {args.services} image services of {settings.slots} slots × {settings.service_ms:.0f} ms "
        f"(± {settings.jitter:.0%}) and {settings.queue} queued: {capacity} images in flight at most, "
        f"{settings.images_per_s * args.services:.0f} images/s. {args.replicas} gateway replicas, one worker "
        f"each; one more at a third of the window, one SIGKILLed at two thirds. Today: capacity learned from "
        f"the services (polled every {args.capacity_poll:g} s), places leased for {args.place_ttl or 30:g} s, "
        f"reserved_for_paid {args.reserved}. Previous: max_in_flight "
        f"{args.max_in_flight or math.ceil(capacity / args.replicas)} per process, reserved_for_paid "
        f"{args.reserved}; its async clients had no jobs to use and honoured Retry-After as the others did.",
        "",
    ]
    for name, run in (("today", today), ("previous", previous)):
        if run is None:
            continue
        f = run["figures"]
        kinds = f["requests"]["by_kind"]
        lines.append(
            f"{name}: surge {run['surge_end_s'] - run['surge_start_s']:.0f} s from its start to the last free "
            f"image; images delivered: Retry-After clients {kinds['retry-after']['images']:,} "
            f"({kinds['retry-after']['posts']:,} POSTs), async clients {kinds['async']['images']:,} "
            f"({kinds['async']['posts']:,} POSTs, {kinds['async']['gets']:,} GETs); jobs ended "
            f"{f['requests']['jobs']}; gave up {f['requests']['gave_up']}; free wait median "
            f"{f['fairness']['median_wait_s']:.1f} s, p99 {f['fairness']['p99_wait_s']:.1f} s; "
            + (
                f"jobs started {f['eta']['median_late']:+.0%} after their ETA (median), Retry-After clients let in "
                f"{f['eta']['retry_after_median_late']:+.0%} after the first turn told; "
                if f["eta"]["jobs"]
                else ""
            )
            + f"paid answers "
            f"{f['paid']['statuses']}; services refused {sum(s['refused'] for s in f['in_flight']['by_service'])}, "
            f"dropped {sum(s['dropped'] for s in f['in_flight']['by_service'])}; events: "
            + "; ".join(f"{e['event']} at {e['at_s'] - run['surge_start_s']:.0f} s" for e in run["events"])
            + ". Other answers: "
            + (", ".join(f"{n} × {what}" for what, n in Counter(f["requests"]["errors"]).most_common(6)) or "none")
            + ". CPU (share of one core): "
            + ", ".join(f"{k} {v:.2f}" for k, v in run["cpu_share"].items())
            + "."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=6_000, help="free accounts arriving (default 6,000)")
    parser.add_argument("--window", type=float, default=120.0, help="seconds over which they arrive (default 120)")
    parser.add_argument("--images", type=int, default=2, help="images each free account wants (default 2; 3 a day)")
    parser.add_argument("--paid-accounts", type=int, default=50)
    parser.add_argument("--paid-rps", type=float, default=10.0, help="paid requests per second (default 10)")
    parser.add_argument("--baseline", type=float, default=10.0, help="seconds of paid load alone first")
    parser.add_argument("--tail", type=float, default=3.0, help="seconds of paid load alone after the surge")
    parser.add_argument("--deadline", type=float, help="seconds after which free accounts still trying are stopped "
                        "(default 4 × window + 60)")  # fmt: skip
    parser.add_argument("--services", type=int, default=2, help="image services (default 2)")
    parser.add_argument("--slots", type=int, default=16, help="images a service makes at a time (default 16)")
    parser.add_argument("--service-ms", type=float, default=500.0, help="ms per image (default 500)")
    parser.add_argument("--jitter", type=float, default=0.2, help="± share of service-ms drawn evenly (default 0.2)")
    parser.add_argument("--queue", type=int, default=16, help="images a service lets wait (default 16)")
    parser.add_argument("--overflow", choices=("hold", "refuse"), default="hold",
                        help="what a service does with images past its capacity (default hold: they show)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=4, help="gateway replicas at the start (default 4)")
    parser.add_argument(
        "--max-in-flight", type=int, help="previous: each process's bound (default: capacity ÷ replicas)"
    )
    parser.add_argument("--reserved", type=float, default=0.25, help="reserved_for_paid, both revisions (default 0.25)")
    parser.add_argument("--place-ttl", type=float, help="today: QUOTAGATE_PLACE_TTL (default: the gateway's, 30 s)")
    parser.add_argument("--capacity-poll", type=float, default=1.0, help="today: QUOTAGATE_CAPACITY_POLL (default 1)")
    parser.add_argument("--today", default=".", help="the revision measured (default `.`, the working tree)")
    parser.add_argument("--previous", default=PREVIOUS, help=f"the revision compared with (default {PREVIOUS})")
    parser.add_argument("--only", choices=("today", "previous"), help="run one revision alone")
    parser.add_argument("--quick", action="store_true", help="2,400 accounts over 40 s: to try the bench")
    args = parser.parse_args(argv)
    if args.quick:
        args.accounts, args.window = 2_400, 40.0
    if args.deadline is None:
        args.deadline = 4 * args.window + 60
    settings = ServiceSettings(args.slots, args.service_ms, args.jitter, args.queue, args.overflow == "hold")
    server_core, load_core, _ = cores()
    os.sched_setaffinity(0, {int(load_core)})
    started = time.perf_counter()
    commit = git("rev-parse", "--short", "HEAD").strip() + ("-dirty" if git("status", "--porcelain").strip() else "")
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "commit": commit,
        "command": " ".join(["bench/surge.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": vars(args),
        "pinning": f"gateway replicas on core {server_core}; load generator, image services and redis-server on "
        f"core {load_core}",
    }
    with contextlib.ExitStack() as trees:
        tmp = Path(trees.enter_context(tempfile.TemporaryDirectory(prefix="qg-surge-trees-")))
        for name, revision in (("previous", args.previous), ("today", args.today)):
            if args.only and args.only != name:
                continue
            tree = trees.enter_context(checked_out(revision, tmp / name))
            results[name] = run_revision(args, name, revision, tree, (server_core, load_core), settings)
    results["wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "surge.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = describe(args, settings, results)
    (RESULTS / "surge.md").write_text(text + "\n")
    print(text)
    print(f"\n{results['wall_s']:.0f} s in all; results in {RESULTS}/surge.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
