"""Benchmark the quota engine against a redis-server of its own: the raw ceiling, the engine, memory.

Run with `make bench` or `.venv/bin/python bench/engine.py`. It prints a markdown table and writes
bench/results/engine.json. Compare ratios within one run; absolute figures drift with the machine.

  (a) ceiling  the decide script alone, as the engine sends it, over EVALSHA: `redis-benchmark -P 16`
               where it is installed, else a tight asyncio loop of 64-deep redis-py pipelines (the
               output says which); plus Redis's own CPU per call (INFO commandstats).
  (b) engine   `Engine.decide` from one Python process at 1, 16 and 64 concurrent workers, with the
               gateway's CPU per decision (time.process_time) and Redis's (INFO cpu); beside it the
               same EVALSHA sent alone through redis-py, to show what the engine adds.
  (c) memory   100,000 accounts decided once each: INFO used_memory after minus before, per account,
               and MEMORY USAGE of one account's keys.
  (d) near-cache  decisions/s for one account whose daily quota is spent, 64 concurrent, with the
               denial near-cache on and off.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import redis
from redis.asyncio import Redis

from gateway.ops.embedded_redis import RedisServer, find_redis_server
from limits import Bucket, DailyQuota, Engine, LimitSet, connect
from limits.keys import counter_key
from limits.nearcache import DenialCache

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"
UTC = ZoneInfo("UTC")

# Every decision admitted and written, the dearest path: a deep bucket and an unlimited (counted) day.
PRO = LimitSet(
    buckets=(Bucket("pro-rate", "rate", rate=1_000_000, period=60, burst=1_000_000),),
    quotas=(DailyQuota("pro-daily", "daily", limit=None, timezone=UTC),),
)
# What an active free account costs in memory: a bucket and a day of 3. A bucket key lives only until
# its bucket is full again (1 s for 60/minute), so this one refills slowly enough to outlive the run;
# its keys are then deleted to see what the day alone keeps.
FREE = LimitSet(
    buckets=(Bucket("free-rate", "rate", rate=60, period=3600, burst=10),),
    quotas=(DailyQuota("free-daily", "daily", limit=3, timezone=UTC),),
)

ACCOUNTS = 1000  # the engine and ceiling runs cycle over this many accounts
DECISIONS = 20_000  # per engine run
CEILING_CALLS = 200_000
MEMORY_ACCOUNTS = 100_000
# The gateway gives up on Redis after 0.5 s; a bench on a loaded machine must not.
BENCH_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_redis_benchmark() -> str | None:
    beside = Path(find_redis_server()).parent / "redis-benchmark"
    return str(beside) if beside.is_file() else shutil.which("redis-benchmark")


def pin(redis_pid: int) -> str:
    """Redis on the first core, this process on the second, as in the notes' measurements."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return "not pinned (one core)"
    os.sched_setaffinity(redis_pid, {cores[0]})
    os.sched_setaffinity(0, {cores[1]})
    return f"redis-server on core {cores[0]}, bench on core {cores[1]}"


async def captured_decide(admin: Redis, url: str) -> list[bytes]:
    """The EVALSHA the engine sends for one PRO decision of account `bench-0`, read back from SLOWLOG."""
    await admin.config_set("slowlog-log-slower-than", 0)
    await admin.slowlog_reset()
    client = connect(url, timeout=BENCH_TIMEOUT)
    try:
        async with Engine(client) as engine:
            await engine.decide("bench-0", PRO, 1)
    finally:
        await client.aclose()
    entries = await admin.execute_command("SLOWLOG", "GET", 100)
    await admin.config_set("slowlog-log-slower-than", 10_000)
    calls = [list(entry[3]) for entry in entries if entry[3][0].upper() == b"EVALSHA"]
    if not calls:
        raise RuntimeError(f"the engine sent no EVALSHA: {entries}")
    return calls[0]


def for_account(command: list[bytes], account: str) -> list[bytes]:
    """The captured command with its keys moved to another account."""
    nkeys = int(command[2])
    keys = [k.replace(b"{bench-0}", b"{" + account.encode() + b"}") for k in command[3 : 3 + nkeys]]
    return [*command[:3], *keys, *command[3 + nkeys :]]


async def redis_cpu_us(admin: Redis) -> float:
    info = await admin.info("cpu")
    return (float(info["used_cpu_sys"]) + float(info["used_cpu_user"])) * 1e6


async def evalsha_usec_per_call(admin: Redis) -> float:
    stats = await admin.info("commandstats")
    return float(stats["cmdstat_evalsha"]["usec_per_call"])


def ceiling_redis_benchmark(binary: str, port: int, command: list[bytes]) -> dict[str, Any]:
    args = [part.decode() for part in for_account(command, "__rand_int__")]
    run = [binary, "-h", "127.0.0.1", "-p", str(port), "-P", "16", "-c", "16", "-n", str(CEILING_CALLS)]
    run += ["-r", str(ACCOUNTS), "-q", *args]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120, check=True).stdout
    rates = re.findall(r"([\d.]+) requests per second", out)
    if not rates:
        raise RuntimeError(f"cannot read redis-benchmark's output: {out!r}")
    return {"method": "redis-benchmark -P 16 -c 16", "per_s": float(rates[-1])}


async def ceiling_pipelined(url: str, command: list[bytes]) -> dict[str, Any]:
    depth, in_flight = 64, 4
    commands = [for_account(command, f"bench-{i}") for i in range(ACCOUNTS)]
    client = Redis.from_url(url)
    rounds = CEILING_CALLS // (depth * in_flight)

    async def loop(offset: int) -> None:
        for r in range(rounds):
            pipe = client.pipeline(transaction=False)
            for i in range(depth):
                pipe.execute_command(*commands[(offset + r * depth + i) % ACCOUNTS])
            await pipe.execute()

    try:
        start = time.perf_counter()
        await asyncio.gather(*(loop(k * 97) for k in range(in_flight)))
        wall = time.perf_counter() - start
    finally:
        await client.aclose()
    method = f"redis-py pipelines, {depth} deep x {in_flight} in flight (no redis-benchmark here; client-bound)"
    return {"method": method, "per_s": rounds * depth * in_flight / wall}


async def measure(admin: Redis, run: Callable[[], Awaitable[int]]) -> dict[str, float]:
    """Decisions/s, gateway CPU µs and Redis CPU µs per decision of `run` (which returns its count)."""
    await admin.config_resetstat()
    redis_before, cpu_before, start = await redis_cpu_us(admin), time.process_time(), time.perf_counter()
    count = await run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_before
    redis_cpu = await redis_cpu_us(admin) - redis_before
    return {
        "decisions": count,
        "per_s": count / wall,
        "client_cpu_us": cpu * 1e6 / count,
        "redis_cpu_us": redis_cpu / count,
        "redis_usec_per_evalsha": await evalsha_usec_per_call(admin),
    }


async def raw_run(client: Redis, command: list[bytes], accounts: list[str], workers: int) -> int:
    """The captured EVALSHA sent alone through redis-py, no engine: what the engine adds to it."""
    commands = {account: for_account(command, account) for account in set(accounts)}

    async def worker(w: int) -> None:
        for account in accounts[w::workers]:
            await client.execute_command(*commands[account])

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return len(accounts)


async def engine_run(engine: Engine, limits: LimitSet, accounts: list[str], workers: int) -> int:
    async def worker(w: int) -> None:
        for account in accounts[w::workers]:
            await engine.decide(account, limits, 1)

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return len(accounts)


async def exhausted_run(engine: Engine, decisions: int, workers: int) -> int:
    """`decisions` refused decisions of one account whose daily quota is spent."""
    assert (await engine.decide("spent", FREE, 3)).allowed
    assert not (await engine.decide("spent", FREE, 1)).allowed
    return await engine_run(engine, FREE, ["spent"] * decisions, workers)


async def bench(server: RedisServer, pinning: str) -> dict[str, Any]:
    assert server.port is not None
    url = f"redis://127.0.0.1:{server.port}/0"
    admin = Redis.from_url(url)
    results: dict[str, Any] = {"pinning": pinning}
    try:
        info = await admin.info("server")
        results["redis_version"] = info["redis_version"]
        command = await captured_decide(admin, url)

        await admin.flushall()
        await admin.config_resetstat()
        binary = find_redis_benchmark()
        if binary:
            ceiling = ceiling_redis_benchmark(binary, server.port, command)
        else:
            ceiling = await ceiling_pipelined(url, command)
        ceiling["redis_usec_per_evalsha"] = await evalsha_usec_per_call(admin)
        ceiling["redis_bound_per_s"] = 1e6 / ceiling["redis_usec_per_evalsha"]
        results["ceiling"] = ceiling

        client = connect(url, timeout=BENCH_TIMEOUT)
        engine = Engine(client)
        try:
            await engine.decide("warm-up", PRO, 1)
            accounts = [f"bench-{i % ACCOUNTS}" for i in range(DECISIONS)]
            results["engine"], results["raw_evalsha"] = {}, {}
            for workers in (1, 16, 64):
                await admin.flushall()
                results["engine"][str(workers)] = await measure(
                    admin, partial(engine_run, engine, PRO, accounts, workers)
                )
            for workers in (1, 64):
                await admin.flushall()
                results["raw_evalsha"][str(workers)] = await measure(
                    admin, partial(raw_run, admin, command, accounts, workers)
                )

            results["near_cache"] = {}
            for label, near_cache in (("off", None), ("on", DenialCache())):
                await admin.flushall()
                async with Engine(client, near_cache=near_cache) as cached:
                    results["near_cache"][label] = await measure(admin, partial(exhausted_run, cached, DECISIONS, 64))

            await admin.flushall()
            before = int((await admin.info("memory"))["used_memory"])
            everyone = [f"user-{i:06d}" for i in range(MEMORY_ACCOUNTS)]
            run = await measure(admin, lambda: engine_run(engine, FREE, everyone, 64))
            after = int((await admin.info("memory"))["used_memory"])
            keys = [counter_key(everyone[0], limit.counter) for limit in FREE]
            usage = {key: await admin.memory_usage(key) for key in keys}
            key_count = await admin.dbsize()
            for start in range(0, MEMORY_ACCOUNTS, 1000):
                await admin.unlink(*(counter_key(a, "rate") for a in everyone[start : start + 1000]))
            day_only = int((await admin.info("memory"))["used_memory"])
            results["memory"] = {
                "accounts": MEMORY_ACCOUNTS,
                "keys": key_count,
                "used_memory_before": before,
                "used_memory_after": after,
                "used_memory_day_only": day_only,
                "bytes_per_account": (after - before) / MEMORY_ACCOUNTS,
                "bytes_per_account_day_only": (day_only - before) / MEMORY_ACCOUNTS,
                "memory_usage_one_account": usage,
                "decisions_per_s": run["per_s"],
            }
        finally:
            await engine.aclose()
            await client.aclose()
    finally:
        await admin.aclose()
    return results


def table(results: dict[str, Any]) -> str:
    ceiling, engine, memory = results["ceiling"], results["engine"], results["memory"]
    top = ceiling["per_s"]
    lines = [
        f"Redis {results['redis_version']}; {results['pinning']}.",
        "",
        "| measurement | decisions/s | ratio to ceiling | client CPU µs/decision | Redis CPU µs/decision |",
        "|---|---:|---:|---:|---:|",
        f"| ceiling: {ceiling['method']} | {top:,.0f} | 1.00 | | "
        f"{ceiling['redis_usec_per_evalsha']:.1f} (commandstats) |",
        f"| ceiling: one Redis core at commandstats' cost | {ceiling['redis_bound_per_s']:,.0f} | "
        f"{ceiling['redis_bound_per_s'] / top:.2f} | | |",
    ]
    for workers, run in engine.items():
        lines.append(
            f"| Engine.decide, {workers} concurrent | {run['per_s']:,.0f} | {run['per_s'] / top:.2f} | "
            f"{run['client_cpu_us']:.1f} | {run['redis_cpu_us']:.1f} |"
        )
    for workers, run in results["raw_evalsha"].items():
        lines.append(
            f"| redis-py EVALSHA alone, no engine, {workers} concurrent | {run['per_s']:,.0f} | "
            f"{run['per_s'] / top:.2f} | {run['client_cpu_us']:.1f} | {run['redis_cpu_us']:.1f} |"
        )
    off, on = results["near_cache"]["off"], results["near_cache"]["on"]
    lines += [
        "",
        "| an exhausted account, 64 concurrent | decisions/s | client CPU µs/decision | Redis CPU µs/decision |",
        "|---|---:|---:|---:|",
        f"| near-cache off (every refusal asks Redis) | {off['per_s']:,.0f} | {off['client_cpu_us']:.1f} | "
        f"{off['redis_cpu_us']:.1f} |",
        f"| near-cache on | {on['per_s']:,.0f} | {on['client_cpu_us']:.1f} | {on['redis_cpu_us']:.1f} |",
        f"| on / off | **{on['per_s'] / off['per_s']:.1f}×** | | |",
    ]
    one = memory["memory_usage_one_account"]
    lines += [
        "",
        "| memory per active account-day (bucket + daily quota) | bytes |",
        "|---|---:|",
        f"| INFO used_memory delta / {memory['accounts']:,} accounts ({memory['keys']:,} keys) | "
        f"{memory['bytes_per_account']:.0f} |",
        f"| the same once the bucket keys are gone (they live until the bucket refills) | "
        f"{memory['bytes_per_account_day_only']:.0f} |",
        *(f"| MEMORY USAGE {key} | {size} |" for key, size in one.items()),
        f"| MEMORY USAGE, one account's keys together | {sum(size or 0 for size in one.values())} |",
    ]
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qg-bench-") as tmp:
        # The same configuration as `quotagate up`: AOF on, fsync every second.
        port = free_port()
        server = RedisServer(Path(tmp), port=port)
        server.start()
        try:
            with redis.Redis(port=port) as admin:
                pid = int(admin.info("server")["process_id"])
            results = asyncio.run(bench(server, pin(pid)))
        finally:
            server.stop()
    results["wall_s"] = time.perf_counter() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n{results['wall_s']:.0f} s in all; JSON in {RESULTS}")


if __name__ == "__main__":
    main()
