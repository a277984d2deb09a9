"""What the gateway costs per request, against the simplest servers that do part of its work, in one run.

Run with `make bench` or `.venv/bin/python bench/overhead.py [--duration S] [--rounds N] [--concurrency 1,16,64,256]`.
Needs `wrk` and `nginx` (Debian's; `make bench` installs them). Writes bench/results/overhead.json,
overhead.md and, where matplotlib is installed, overhead.png.

Every server under test runs on the first core; wrk, the stub upstream (an nginx answering a fixed JSON
image list) and redis-server share the second, so the server's core does only the server's work:

  bare app            uvicorn + Starlette answering JSON: the ceiling of any Python app here
  passthrough proxy   uvicorn + Starlette + aiohttp forwarding to the stub, no auth, no limiting
  passthrough, gateway's client   the same over the gateway's own upstream client (gateway/upstream/client.py)
  passthrough + 1 Redis call      that, after one Redis script call through the gateway's coalescer
                      (a script that answers 1): proxying plus the round trip an exact shared decision
                      needs; the gateway against it is what the limiting's own work costs
  nginx limit_req     Debian's nginx, `limit_req` keyed on the Authorization header, proxying to the stub
  gateway             `quotagate serve`: key → plan → one Redis decision → forward → settle
  gateway 429         the same gateway, a free account whose daily 3 are spent (the denial path)
  nginx 429           nginx refusing every request with `limit_req_status 429`
  upstream direct     the stub itself, for the latency the gateway adds

For each: requests/s, latency p50/p99 (wrk --latency) and the server's CPU µs per request (utime+stime
of its processes from /proc, the low-noise figure: it does not depend on what else runs on the other
core). Each server is run `--rounds` times at each concurrency, interleaved with the others, and the
run of median CPU is kept. Ratios are taken within one run; absolute numbers drift with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis as redis_py

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
# Run as a script, bench/ comes first on sys.path; the packages live in the repository root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.admission.identity import KeyStore  # noqa: E402
from gateway.ops.embedded_redis import RedisServer  # noqa: E402
from limits import connect  # noqa: E402
from tests.ports import free_port  # noqa: E402

SECRET = "bench-secret-of-at-least-16-bytes"
PATH = "/v1/images/generations"
BODY = '{"prompt": "a lighthouse at dusk", "n": 1}'
STUB_ANSWER = '{"created": 0, "data": [{"b64_json": "aW1hZ2U="}]}'
# `bench` is never refused, so every request takes the whole path; `free` is the launch-day plan.
QUOTAS = """\
timezone: UTC
plans:
  free:
    priority: 0
    daily_images: 3
    rate: {images: 6, per: minute, burst: 3}
  bench:
    priority: 10
    daily_images: unlimited
    rate: {images: 100000, per: second, burst: 1000000}
routes:
  - path: /v1/images/generations
    upstream: diffusion
    cost: images
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENT_PASSTHROUGH = "passthrough, gateway's client"
ROUND_TRIP_PASSTHROUGH = "passthrough + 1 Redis call"


@dataclass
class Target:
    """One server under test and the request wrk sends it."""

    name: str
    url: str
    pids: list[int]
    headers: dict[str, str] = field(default_factory=dict)
    expect_status: int = 200


def cores() -> tuple[str, str, str]:
    """(server core, load core, description): the server alone on one core, everything else on another."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return str(available[0]), str(available[0]), "not pinned (one core)"
    server, load = available[0], available[1]
    return str(server), str(load), f"servers on core {server}; wrk, the stub upstream and redis-server on core {load}"


def need(program: str) -> str:
    found = shutil.which(program)
    if not found:
        sys.exit(
            f"bench/overhead.py: `{program}` is not installed; `make bench` installs it (apt-get install {program})"
        )
    return found


def nginx_conf(tmp: Path, name: str, server_block: str, http_extra: str = "") -> Path:
    """A one-process nginx (no master) whose every path is under `tmp`, so it needs no system directory."""
    prefix = tmp / name
    prefix.mkdir()
    temps = "\n".join(
        f"  {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temps}
{http_extra}
  server {{
{server_block}
  }}
}}
"""
    )
    return conf


# What the stub advertises to the gateway (GET /v1/capacity): room for every request a bench sends at once.
STUB_CAPACITY = json.dumps(
    {"slots": 100_000, "queue_images": 0, "queued_images": 0, "running_images": 0, "images_per_s": 1e5, "ready": True}
)


def stub_command(tmp: Path, nginx: str, port: int) -> list[str]:
    """An nginx answering STUB_ANSWER to every request on `port` (and STUB_CAPACITY to the gateway's capacity
    polls): the fast upstream the benches forward to."""
    conf = nginx_conf(
        tmp,
        "stub",
        f"    listen 127.0.0.1:{port} backlog=4096;\n"
        f"    location = /v1/capacity {{ default_type application/json; return 200 '{STUB_CAPACITY}'; }}\n"
        f"    location / {{ default_type application/json; return 200 '{STUB_ANSWER}'; }}",
    )
    return [nginx, "-c", str(conf), "-e", str(tmp / "stub" / "error.log")]


def spawn(
    core: str, *command: str, env: dict[str, str] | None = None, log: Path | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """`command` on `core`. `python -m` puts its working directory first on sys.path, ahead of PYTHONPATH: a
    command that runs another tree's packages needs that tree as `cwd`."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it open
    return subprocess.Popen(
        ["taskset", "-c", core, *command],
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )


def wait_answering(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode} while starting")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn with --workers forks; a single worker does not)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of `pids`, from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return total / CLK_TCK


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests, requests/s, p50/p99 in ms and error counts from `wrk --latency` output."""
    total = re.search(r"(\d+) requests in", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not total or not rate:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    latency = {
        f"p{m.group(1)}_ms": float(m.group(2)) * _UNITS[m.group(3)]
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests": int(total.group(1)),
        "per_s": float(rate.group(1)),
        **latency,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
    }


def wrk_script(tmp: Path, target: Target) -> Path:
    script = tmp / f"{target.name.replace(' ', '-')}.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = '{BODY}'", 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in target.headers.items()]
    script.write_text("\n".join(lines) + "\n")
    return script


def run_wrk(load_core: str, tmp: Path, target: Target, connections: int, duration: float) -> dict[str, Any]:
    """One wrk run against `target`, with the CPU its server processes spent meanwhile."""
    command = [
        "taskset",
        "-c",
        load_core,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
    ]
    command += ["-s", str(wrk_script(tmp, target)), target.url + PATH]
    pids = [p for pid in target.pids for p in process_tree(pid)]
    before = cpu_seconds(pids)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    output = done.stdout
    result = parse_wrk(output)
    result["server_cpu_us"] = (cpu_seconds(pids) - before) * 1e6 / max(result["requests"], 1)
    wrong = result["non_2xx"] if target.expect_status == 200 else result["requests"] - result["non_2xx"]
    result["unexpected_status"] = wrong
    return result


async def make_keys(redis_url: str) -> tuple[str, str]:
    """A key of the unlimited `bench` plan, and a `free` key (exhausted later through the gateway)."""
    redis = connect(redis_url)
    try:
        store = KeyStore(redis, SECRET.encode())
        return await store.create_key("bench-paid", "bench"), await store.create_key("bench-free", "free")
    finally:
        await redis.aclose()


@contextmanager
def servers(tmp: Path, server_core: str, load_core: str) -> Iterator[list[Target]]:
    """Start every server under test; yield them as targets; stop them all."""
    need("wrk")
    nginx = need("nginx")
    processes: list[subprocess.Popen[bytes]] = []
    redis = RedisServer(tmp / "redis", port=free_port())

    def start(core: str, *command: str, env: dict[str, str] | None = None, log: str = "") -> subprocess.Popen[bytes]:
        process = spawn(core, *command, env=env, log=tmp / f"{log}.log" if log else None)
        processes.append(process)
        return process

    try:
        stub_port = free_port()
        stub = start(load_core, *stub_command(tmp, nginx, stub_port), log="stub")
        stub_url = f"http://127.0.0.1:{stub_port}"
        wait_answering(stub_url, stub)

        redis.start()
        with redis_py.Redis.from_url(redis.url) as admin:
            os.sched_setaffinity(int(admin.info("server")["process_id"]), {int(load_core)})
        paid_key, free_key = asyncio.run(make_keys(redis.url))

        uvicorn = [sys.executable, "-m", "uvicorn", "--no-access-log", "--log-level", "warning", "--factory"]
        names = ("bare", "passthrough", "client", "round_trip", "gateway", "nginx", "nginx429")
        ports = {name: free_port() for name in names}
        bare = start(server_core, *uvicorn, "--app-dir", str(BENCH), "--port", str(ports["bare"]), "servers:bare_app")
        passthrough = start(
            server_core, *uvicorn, "--app-dir", str(BENCH), "--port", str(ports["passthrough"]),
            "servers:passthrough_app", env={"BENCH_UPSTREAM": stub_url}, log="passthrough",
        )  # fmt: skip
        client_passthrough = start(
            server_core, *uvicorn, "--app-dir", str(BENCH), "--port", str(ports["client"]),
            "servers:client_passthrough_app", env={"BENCH_UPSTREAM": stub_url}, log="client-passthrough",
        )  # fmt: skip
        round_trip_passthrough = start(
            server_core, *uvicorn, "--app-dir", str(BENCH), "--port", str(ports["round_trip"]),
            "servers:round_trip_passthrough_app", env={"BENCH_UPSTREAM": stub_url, "BENCH_REDIS": redis.url},
            log="round-trip-passthrough",
        )  # fmt: skip
        quotas = tmp / "quotas.yaml"
        quotas.write_text(QUOTAS)
        gateway_env = {"QUOTAGATE_KEY_SECRET": SECRET, "PYTHONPATH": str(ROOT)}
        gateway = start(
            server_core, sys.executable, "-m", "gateway.ops.cli", "serve", "--config", str(quotas),
            "--redis-url", redis.url, "--upstream", f"diffusion={stub_url}", "--port", str(ports["gateway"]),
            env=gateway_env, log="gateway",
        )  # fmt: skip
        proxy_to_stub = (
            "proxy_pass http://stub; proxy_http_version 1.1; proxy_set_header Connection ''; "
            "proxy_set_header Authorization '';"
        )
        keepalive = f"  upstream stub {{ server 127.0.0.1:{stub_port}; keepalive 256; }}"
        limiting = nginx_conf(
            tmp,
            "nginx",
            f"    listen 127.0.0.1:{ports['nginx']} backlog=4096;\n"
            f"    location / {{ limit_req zone=perkey burst=1000000 nodelay; {proxy_to_stub} }}",
            f"  limit_req_zone $http_authorization zone=perkey:10m rate=1000000r/s;\n{keepalive}",
        )
        refusing = nginx_conf(
            tmp,
            "nginx429",
            f"    listen 127.0.0.1:{ports['nginx429']} backlog=4096;\n"
            f"    location / {{ limit_req zone=spent; limit_req_status 429; {proxy_to_stub} }}",
            f"  limit_req_zone $http_authorization zone=spent:10m rate=1r/m;\n{keepalive}",
        )
        nginx_limit = start(server_core, nginx, "-c", str(limiting), "-e", str(tmp / "nginx" / "error.log"))
        nginx_refuse = start(server_core, nginx, "-c", str(refusing), "-e", str(tmp / "nginx429" / "error.log"))

        url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        started = (
            ("bare", bare),
            ("passthrough", passthrough),
            ("client", client_passthrough),
            ("round_trip", round_trip_passthrough),
            ("gateway", gateway),
        )
        for name, process in started:
            wait_answering(url[name] + "/healthz", process)
        for name, process in (("nginx", nginx_limit), ("nginx429", nginx_refuse)):
            wait_answering(url[name], process)
        # Spend the free account's day and the nginx 429 zone's one request, so that both refuse from now on.
        for _ in range(4):
            httpx.post(url["gateway"] + PATH, content=BODY, headers={"Authorization": f"Bearer {free_key}"})
            httpx.post(url["nginx429"] + PATH, content=BODY, headers={"Authorization": "Bearer spent"})

        yield [
            Target("bare app", url["bare"], [bare.pid]),
            Target("passthrough proxy", url["passthrough"], [passthrough.pid]),
            Target(CLIENT_PASSTHROUGH, url["client"], [client_passthrough.pid]),
            Target(ROUND_TRIP_PASSTHROUGH, url["round_trip"], [round_trip_passthrough.pid]),
            Target("nginx limit_req", url["nginx"], [nginx_limit.pid], {"Authorization": "Bearer k"}),
            Target("gateway", url["gateway"], [gateway.pid], {"Authorization": f"Bearer {paid_key}"}),
            Target("gateway 429", url["gateway"], [gateway.pid], {"Authorization": f"Bearer {free_key}"}, 429),
            Target("nginx 429", url["nginx429"], [nginx_refuse.pid], {"Authorization": "Bearer spent"}, 429),
            Target("upstream direct", stub_url, [stub.pid]),
        ]
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        redis.stop()


def measure(
    targets: list[Target], tmp: Path, load_core: str, concurrency: list[int], duration: float, rounds: int
) -> dict:
    """Every target at every concurrency, `rounds` times, the targets interleaved so that noise hits them alike.

    Kept per target and concurrency: the run of median server CPU, with every run's CPU beside it
    (`cpu_us_runs`). A few seconds of a busy neighbour then move one run, not the figure.
    """
    runs: dict[str, dict[str, Any]] = {target.name: {} for target in targets}
    for target in targets:  # warm-up: connections, caches, the JIT-less interpreter's first paths
        run_wrk(load_core, tmp, target, 16, 1.0)
    for connections in concurrency:
        tries: dict[str, list[dict[str, Any]]] = {target.name: [] for target in targets}
        for round_ in range(rounds):
            for target in targets if round_ % 2 == 0 else reversed(targets):  # alternate who goes first
                tries[target.name].append(run_wrk(load_core, tmp, target, connections, duration))
        for name, done in tries.items():
            median = sorted(done, key=lambda run: run["server_cpu_us"])[(len(done) - 1) // 2]
            runs[name][str(connections)] = {**median, "cpu_us_runs": [round(run["server_cpu_us"]) for run in done]}
    return runs


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per concurrency: the target ratios, by throughput and by server CPU per request."""
    return {c: ratios_at(runs, c) for c in runs["gateway"]}


def ratios_at(runs: dict[str, dict[str, Any]], c: str) -> dict[str, float]:
    def rate(name: str) -> float:
        return float(runs[name][c]["per_s"])

    def cpu(name: str) -> float:
        return float(runs[name][c]["server_cpu_us"])

    def p50(name: str) -> float:
        return float(runs[name][c]["p50_ms"])

    return {
        "gateway / passthrough (rps)": rate("gateway") / rate("passthrough proxy"),
        "gateway / passthrough (CPU)": cpu("passthrough proxy") / cpu("gateway"),
        "gateway / passthrough with the gateway's client (CPU)": cpu(CLIENT_PASSTHROUGH) / cpu("gateway"),
        "passthrough + 1 Redis call / passthrough (CPU)": cpu("passthrough proxy") / cpu(ROUND_TRIP_PASSTHROUGH),
        "gateway / passthrough + 1 Redis call (CPU)": cpu(ROUND_TRIP_PASSTHROUGH) / cpu("gateway"),
        "gateway 429 / bare app (rps)": rate("gateway 429") / rate("bare app"),
        "gateway 429 / bare app (CPU)": cpu("bare app") / cpu("gateway 429"),
        "passthrough / bare app (rps)": rate("passthrough proxy") / rate("bare app"),
        "gateway / bare app (rps)": rate("gateway") / rate("bare app"),
        "gateway / nginx limit_req (rps)": rate("gateway") / rate("nginx limit_req"),
        "gateway added p50 over upstream direct (ms)": p50("gateway") - p50("upstream direct"),
        "gateway added p50 over passthrough (ms)": p50("gateway") - p50("passthrough proxy"),
    }


def table(results: dict[str, Any]) -> str:
    each = f"{results['rounds']} runs of {results['duration_s']:.0f} s each, the run of median server CPU shown"
    runs, lines = results["runs"], [f"{results['pinning']}; {each}.", ""]
    lines += [
        "| server | connections | requests/s | ratio to bare app | p50 ms | p99 ms | server CPU µs/request | "
        "unexpected status | socket errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["concurrency"]:
        bare = runs["bare app"][str(c)]["per_s"]
        for name, by_c in runs.items():
            run = by_c[str(c)]
            lines.append(
                f"| {name} | {c} | {run['per_s']:,.0f} | {run['per_s'] / bare:.2f} | {run.get('p50_ms', 0):.2f} | "
                f"{run.get('p99_ms', 0):.2f} | {run['server_cpu_us']:.0f} | "
                f"{run['unexpected_status']} | {run['socket_errors']} |"
            )
    names = list(next(iter(results["ratios"].values())))
    lines += ["", "| ratio | " + " | ".join(f"c={c}" for c in results["concurrency"]) + " |"]
    lines += ["|---|" + "---:|" * len(results["concurrency"])]
    for name in names:
        cells = " | ".join(f"{results['ratios'][str(c)][name]:.2f}" for c in results["concurrency"])
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per wrk run (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and concurrency (default 3)")
    parser.add_argument("--concurrency", default="1,16,64,256", help="open connections, comma-separated")
    args = parser.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    server_core, load_core, pinning = cores()
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="qg-overhead-") as tmp,
        servers(Path(tmp), server_core, load_core) as targets,
    ):
        runs = measure(targets, Path(tmp), load_core, concurrency, args.duration, args.rounds)
    results = {
        "pinning": pinning,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "concurrency": concurrency,
        "runs": runs,
        "ratios": ratios(runs),
        "wall_s": time.perf_counter() - started,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (RESULTS / "overhead.md").write_text(text + "\n")
    print(text)
    try:
        from plots import plot_overhead
    except ImportError:  # matplotlib is the optional `bench` extra
        print("matplotlib not installed: no overhead.png (pip install '.[bench]')")
    else:
        plot_overhead(results, RESULTS / "overhead.png")
    print(f"\n{results['wall_s']:.0f} s in all; results in {RESULTS}/overhead.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
