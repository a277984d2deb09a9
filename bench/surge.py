"""Launch day, compressed: a flood of new free accounts while paid customers keep working.

Run with `make bench` or `.venv/bin/python bench/surge.py [--accounts 100000 --window 180] [--quick]`.
Writes bench/results/surge.json, surge.md and, where matplotlib is installed, surge.png.

The whole stack runs for real: redis-server, `quotagate serve` (alone on the first core), and an image
service of fixed capacity (bench/servers.py:capacity_app: SLOTS images at a time, SERVICE_MS each, a
bounded queue, 503 past it). The load generator, on the second core:

  paid   PAID_ACCOUNTS accounts sending PAID_RPS requests a second in all, open loop (on a schedule,
         whatever the answers), first alone for BASELINE seconds (the unloaded p99), then throughout;
  free   ACCOUNTS new accounts arriving evenly over WINDOW seconds, each trying 5 images one after
         the other (the plan allows 3 a day), waiting out the Retry-After of a 503 before the next.

Every answer is counted per second and plan as admitted (200), shed (503: the gateway or the service
turned it away for lack of capacity), rejected (429: a quota or rate limit) or failed (anything else).
The gateway bounds what it forwards to the service (`pools: diffusion: max_in_flight`, default 8 here:
twice the service's slots) and keeps `reserved_for_paid` of it (0.5) for paid plans, so free requests
are shed at the gateway with a jittered Retry-After before they cost a Redis decision.
The goal: the paid p99 stays within 2x its unloaded value while free traffic is shed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_py
import uvloop
from prometheus_client.parser import text_string_to_metric_families

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Run as a script, bench/ comes first on sys.path; the packages live in the repository root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from overhead import RESULTS, SECRET, cores, cpu_seconds, process_tree, spawn, wait_answering  # noqa: E402

from gateway.admission.identity import KeyStore  # noqa: E402
from gateway.ops.embedded_redis import RedisServer  # noqa: E402
from gateway.upstream.client import Origin, UpstreamClient, UpstreamError  # noqa: E402
from limits import connect  # noqa: E402
from tests.ports import free_port  # noqa: E402

PATH = "/v1/images/generations"
REQUEST_BODY = b'{"prompt": "launch day"}'
TRIES = 5
MAX_RETRY_AFTER = 10.0  # seconds a free client waits at most when told to come back later
QUOTAS = """\
timezone: UTC
plans:
  free:
    priority: 0
    daily_images: 3
    rate: {images: 60, per: minute, burst: 5}
  paid:
    priority: 10
    daily_images: unlimited
    rate: {images: 100000, per: minute, burst: 1000}
routes:
  - path: /v1/images/generations
    upstream: diffusion
    cost: images
pools:
  diffusion:
    max_in_flight: MAX_IN_FLIGHT
    reserved_for_paid: RESERVED_FOR_PAID
"""


PLANS = ("free", "paid")
OUTCOMES = ("admitted", "rejected", "shed", "failed")


@dataclass
class Recorder:
    """Every answer: when (seconds from the start), which plan, what outcome, how long it took.

    Kept in arrays of numbers, which Python's collector never scans: as a list of 500,000 tuples it
    lengthened this process's full collections to ~60 ms, and every request in flight meanwhile
    looked that much slower.
    """

    started: float = field(default_factory=time.monotonic)
    at: array[float] = field(default_factory=lambda: array("d"))
    plan: array[int] = field(default_factory=lambda: array("b"))
    outcome: array[int] = field(default_factory=lambda: array("b"))
    ms: array[float] = field(default_factory=lambda: array("d"))
    codes: Counter[str] = field(default_factory=Counter)

    def add(self, plan: str, status: int, code: str | None, sent: float) -> None:
        now = time.monotonic()
        outcome = {200: "admitted", 429: "rejected", 503: "shed"}.get(status, "failed")
        self.at.append(now - self.started)
        self.plan.append(PLANS.index(plan))
        self.outcome.append(OUTCOMES.index(outcome))
        self.ms.append((now - sent) * 1000)
        self.codes[f"{plan} {status} {code}"] += 1

    @property
    def answers(self) -> list[tuple[float, str, str, float]]:
        """(at, plan, outcome, ms) of every answer, in the order they came."""
        return [
            (at, PLANS[plan], OUTCOMES[outcome], ms)
            for at, plan, outcome, ms in zip(self.at, self.plan, self.outcome, self.ms, strict=True)
        ]


async def request(client: UpstreamClient, gateway: Origin, key: str, plan: str, record: Recorder) -> float:
    """Send one request and record its answer; the Retry-After of a 503, in seconds (0 otherwise)."""
    sent = time.monotonic()
    headers = (("Authorization", f"Bearer {key}"), ("Content-Type", "application/json"))
    try:
        answer = await client.send(gateway, "POST", PATH, headers, REQUEST_BODY)
        try:
            body = await answer.read()
        finally:
            answer.release()
    except UpstreamError as exc:
        record.add(plan, 0, str(exc), sent)
        return 0.0
    payload = json.loads(body) if body.startswith(b"{") else None
    code = (payload.get("error") or {}).get("code") if isinstance(payload, dict) else None
    record.add(plan, answer.status, code, sent)
    retry_after = next((value for name, value in answer.headers if name.lower() == b"retry-after"), b"")
    return float(retry_after) if answer.status == 503 and retry_after.isdigit() else 0.0


async def paid_load(client: UpstreamClient, gateway: Origin, keys: list[str], rps: float, until: asyncio.Event,
                    record: Recorder) -> None:  # fmt: skip
    """Open loop: one request every 1/rps seconds, round-robin over the paid keys, until `until` is set."""
    tasks: set[asyncio.Task[None]] = set()
    start, i = time.monotonic(), 0
    while not until.is_set():
        task = asyncio.create_task(request(client, gateway, keys[i % len(keys)], "paid", record))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        await asyncio.sleep(max(0.0, start + i / rps - time.monotonic()))
    await asyncio.gather(*tasks)


async def free_account(client: UpstreamClient, gateway: Origin, key: str, record: Recorder) -> None:
    """Five tries, one after the other; after a 503 the client waits its Retry-After, as OpenAI's client does."""
    for _ in range(TRIES):
        await asyncio.sleep(min(await request(client, gateway, key, "free", record), MAX_RETRY_AFTER))


async def free_surge(client: UpstreamClient, gateway: Origin, keys: list[str], window: float, record: Recorder) -> None:
    """Account i arrives at i/len(keys) of the window and tries its images one after the other."""
    # Only the accounts still trying are kept: 100,000 finished tasks would slow this process's
    # garbage collector, and its pauses would count as the gateway's latency.
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    for i, key in enumerate(keys):
        await asyncio.sleep(max(0.0, start + window * i / len(keys) - time.monotonic()))
        task = asyncio.create_task(free_account(client, gateway, key, record))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*tasks)


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


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else (latencies or [0.0])[0]


def summarize(record: Recorder, baseline_end: float, surge_end: float, args: argparse.Namespace) -> dict[str, Any]:
    timeline: dict[int, dict[str, Any]] = defaultdict(lambda: {"free": Counter(), "paid": Counter(), "paid_ms": []})
    answers = record.answers
    for at, plan, outcome, ms in answers:
        row = timeline[int(at)]
        row[plan][outcome] += 1
        if plan == "paid":
            row["paid_ms"].append(ms)
    unloaded = [ms for at, plan, outcome, ms in answers if plan == "paid" and at < baseline_end]
    loaded = [ms for at, plan, _, ms in answers if plan == "paid" and baseline_end <= at < surge_end]
    totals = {plan: Counter(o for _, p, o, _ in answers if p == plan) for plan in PLANS}
    unloaded_p99, loaded_p99 = p99(unloaded), p99(loaded)
    return {
        "plans": ["free", "paid"],
        "settings": vars(args),
        "paid_p99_unloaded_ms": unloaded_p99,
        "paid_p50_unloaded_ms": statistics.median(unloaded) if unloaded else 0.0,
        "paid_p99_surge_ms": loaded_p99,
        "paid_p50_surge_ms": statistics.median(loaded) if loaded else 0.0,
        "paid_p99_ratio": loaded_p99 / unloaded_p99 if unloaded_p99 else float("inf"),
        "totals": {plan: dict(counts) for plan, counts in totals.items()},
        "codes": dict(record.codes),
        "timeline": [
            {
                "t": second,
                "free": dict(row["free"]),
                "paid": dict(row["paid"]),
                "paid_p99_ms": p99(row["paid_ms"]) if row["paid_ms"] else 0.0,
            }
            for second, row in sorted(timeline.items())
        ],
    }


def table(results: dict[str, Any]) -> str:
    s = results["settings"]
    ratio = results["paid_p99_ratio"]
    lines = [
        f"{s['accounts']:,} free accounts over {s['window']:.0f} s, {TRIES} tries each; {s['paid_rps']:.0f} paid "
        f"requests/s; image service: {s['slots']} at a time, {s['service_ms']:.0f} ms each "
        f"({s['slots'] * 1000 / s['service_ms']:.0f} images/s), queue {s['queue']}; gateway pool bound "
        f"{s['max_in_flight']}, {s['reserved']:.0%} kept for paid. {results['pinning']}.",
        "",
        "| plan | admitted | shed (503) | rejected (429) | failed |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {plan} | {t.get('admitted', 0):,} | {t.get('shed', 0):,} | {t.get('rejected', 0):,} | "
            f"{t.get('failed', 0):,} |"
            for plan, t in results["totals"].items()
        ),
        "",
        "| paid latency | unloaded | during the surge | ratio (target ≤ 2) |",
        "|---|---:|---:|---:|",
        f"| p50 ms | {results['paid_p50_unloaded_ms']:.1f} | {results['paid_p50_surge_ms']:.1f} | |",
        f"| p99 ms | {results['paid_p99_unloaded_ms']:.1f} | {results['paid_p99_surge_ms']:.1f} | "
        f"{ratio:.2f} {'(met)' if ratio <= 2 else '(**not met**)'} |",
        "",
        "CPU used over the run, as a share of one core: "
        + ", ".join(f"{name} {share:.2f}" for name, share in results["cpu_share"].items())
        + ".",
    ]
    return "\n".join(lines)


def _samples(exposition: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of `name` in a Prometheus text exposition, with their labels."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name
    ]


def cpu_by_process(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each named group of processes (this one is `load generator`)."""
    used = {name: cpu_seconds(group) for name, group in pids.items()}
    times = os.times()
    return {**used, "load generator": times.user + times.system}


async def simulate(
    args: argparse.Namespace, gateway_url: str, redis_url: str, pinning: str, pids: dict[str, list[int]]
) -> dict[str, Any]:
    paid_keys = await make_keys(redis_url, "paid", args.paid_accounts)
    free_keys = await make_keys(redis_url, "free", args.accounts)
    # What set-up made lives to the end: out of the collector's scans, whose pauses would count as latency.
    gc.collect()
    gc.freeze()
    cpu_before, wall_before = cpu_by_process(pids), time.monotonic()
    # The gateway's own upstream client, on uvloop: at ~300 µs of CPU a request, aiohttp's client on
    # asyncio's loop saturated the core this process shares with the image service and redis-server,
    # and their delays (and this process's own) counted as the gateway's latency. Idle connections are
    # dropped after 4 s, before the gateway's uvicorn drops them after 5.
    client = UpstreamClient(connect_timeout=10.0, read_timeout=60.0)
    gateway = Origin.parse(gateway_url)
    try:
        record = Recorder()
        stop_paid = asyncio.Event()
        paid = asyncio.create_task(paid_load(client, gateway, paid_keys, args.paid_rps, stop_paid, record))
        await asyncio.sleep(args.baseline)
        baseline_end = time.monotonic() - record.started
        await free_surge(client, gateway, free_keys, args.window, record)
        surge_end = time.monotonic() - record.started
        await asyncio.sleep(args.tail)
        stop_paid.set()
        await paid
        wall, cpu_after = time.monotonic() - wall_before, cpu_by_process(pids)
        scraped = await client.send(gateway, "GET", "/metrics", (), b"")
        try:
            exposition = (await scraped.read()).decode()
        finally:
            scraped.release()
    finally:
        await client.close()
    results = summarize(record, baseline_end, surge_end, args)
    # What the gateway itself counted, by plan and outcome: who shed a request, the gateway or the service.
    results["gateway_outcomes"] = {
        f"{labels['plan']} {labels['outcome']}": value
        for labels, value in _samples(exposition, "quotagate_requests_total")
        if value
    }
    # Each process's share of one core over the run: a process near 1.0 was the bottleneck.
    results["cpu_share"] = {name: (cpu_after[name] - cpu_before[name]) / wall for name in cpu_after}
    results["pinning"] = pinning
    results["baseline_s"] = baseline_end
    results["surge_s"] = surge_end - baseline_end
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=100_000, help="free accounts arriving (default 100,000)")
    parser.add_argument("--window", type=float, default=240.0, help="seconds over which they arrive (default 240)")
    parser.add_argument("--paid-accounts", type=int, default=50)
    parser.add_argument("--paid-rps", type=float, default=20.0, help="paid requests per second (default 20)")
    parser.add_argument("--baseline", type=float, default=10.0, help="seconds of paid load alone first")
    parser.add_argument("--tail", type=float, default=3.0, help="seconds of paid load alone after the surge")
    parser.add_argument("--slots", type=int, default=4, help="images the service makes at a time")
    parser.add_argument("--service-ms", type=float, default=20.0, help="ms per image")
    parser.add_argument("--queue", type=int, default=64, help="requests the service lets wait")
    parser.add_argument("--max-in-flight", type=int, default=8, help="the gateway's bound on the pool (default 8)")
    parser.add_argument("--reserved", type=float, default=0.5, help="share of it kept for paid plans (default 0.5)")
    parser.add_argument("--quick", action="store_true", help="10,000 accounts over 60 s: to try the bench")
    args = parser.parse_args(argv)
    if args.quick:
        args.accounts, args.window, args.baseline = 10_000, 60.0, 5.0
    server_core, load_core, _ = cores()
    pinning = f"gateway on core {server_core}; load generator, image service and redis-server on core {load_core}"
    os.sched_setaffinity(0, {int(load_core)})
    started = time.perf_counter()
    processes = []
    with tempfile.TemporaryDirectory(prefix="qg-surge-") as tmp:
        redis = RedisServer(Path(tmp) / "redis", port=free_port())
        redis.start()
        try:
            service_port, gateway_port = free_port(), free_port()
            service_env = {"BENCH_SLOTS": str(args.slots), "BENCH_SERVICE_MS": str(args.service_ms),
                           "BENCH_QUEUE": str(args.queue)}  # fmt: skip
            uvicorn = [sys.executable, "-m", "uvicorn", "--no-access-log", "--log-level", "warning", "--factory"]
            service = spawn(load_core, *uvicorn, "--app-dir", str(BENCH), "--port", str(service_port),
                            "servers:capacity_app", env=service_env)  # fmt: skip
            processes.append(service)
            quotas = Path(tmp) / "quotas.yaml"
            pool = {"MAX_IN_FLIGHT": str(args.max_in_flight), "RESERVED_FOR_PAID": str(args.reserved)}
            quotas.write_text(functools.reduce(lambda text, item: text.replace(*item), pool.items(), QUOTAS))
            gateway = spawn(
                server_core, sys.executable, "-m", "gateway.ops.cli", "serve", "--config", str(quotas),
                "--redis-url", redis.url, "--upstream", f"diffusion=http://127.0.0.1:{service_port}",
                "--port", str(gateway_port),
                env={"QUOTAGATE_KEY_SECRET": SECRET, "PYTHONPATH": str(ROOT)}, log=Path(tmp) / "gateway.log",
            )  # fmt: skip
            processes.append(gateway)
            wait_answering(f"http://127.0.0.1:{service_port}/healthz", service)
            wait_answering(f"http://127.0.0.1:{gateway_port}/healthz", gateway)
            with redis_py.Redis.from_url(redis.url) as admin:
                redis_pid = int(admin.info("server")["process_id"])
            pids = {"gateway": process_tree(gateway.pid), "image service": [service.pid], "redis-server": [redis_pid]}
            results = uvloop.run(simulate(args, f"http://127.0.0.1:{gateway_port}", redis.url, pinning, pids))
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)
            redis.stop()
    results["wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "surge.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (RESULTS / "surge.md").write_text(text + "\n")
    print(text)
    try:
        from plots import plot_surge
    except ImportError:
        print("matplotlib not installed: no surge.png (pip install '.[bench]')")
    else:
        plot_surge(results, RESULTS / "surge.png")
    print(f"\n{results['wall_s']:.0f} s in all; results in {RESULTS}/surge.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
