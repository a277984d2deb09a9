"""Backend throughput with dynamic batching on vs off, measured in one run.

Starts `quotagate-backend serve` twice on loopback with the tiny model at 64x64 (batching on, then off),
sends bursts of 16 single-image requests at once, and prints images/s for each and their ratio.
Results go to bench/results/backend.json. Not part of the tests: run `python bench/backend.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "backend.json"
# Run as a script, this file's folder comes first on sys.path and its name would shadow the `backend` package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SIZE = "64x64"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_server(model: Path, port: int, batching: str, threads: int, pin: bool) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "backend.cli", "serve",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
        "--sizes", SIZE, "--default-size", SIZE, "--batching", batching, "--threads", str(threads),
        "--max-queue", "256", "--log-level", "warning",
    ]  # fmt: skip
    # Server on core 0, load generator on the others, so that they do not fight over one core.
    if pin and shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _wait_ready(client: httpx.AsyncClient, server: subprocess.Popen[bytes], deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the server did not become ready")


async def _burst(client: httpx.AsyncClient, requests: int) -> float:
    """Seconds for `requests` concurrent single-image requests to all come back."""
    began = time.perf_counter()
    responses = await asyncio.gather(
        *(client.post("/v1/images/generations", json={"prompt": f"bench {i}", "size": SIZE}) for i in range(requests))
    )
    elapsed = time.perf_counter() - began
    failed = [r.status_code for r in responses if r.status_code != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[:5]}")
    return elapsed


async def _measure(model: Path, batching: str, args: argparse.Namespace) -> dict[str, object]:
    port = _free_port()
    server = _start_server(model, port, batching, args.threads, args.pin)
    try:
        limits = httpx.Limits(max_connections=args.requests)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as client:
            await _wait_ready(client, server)
            await _burst(client, args.requests)  # warm-up: connections, allocator, first batch shapes
            times = [await _burst(client, args.requests) for _ in range(args.rounds)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    median = statistics.median(times)
    return {
        "batching": batching,
        "images_per_s": round(args.requests / median, 2),
        "burst_seconds": [round(t, 4) for t in times],
    }


async def _main(args: argparse.Namespace) -> dict[str, object]:
    from backend.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        if args.pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
        on = await _measure(model, "on", args)
        off = await _measure(model, "off", args)
    on_rate, off_rate = float(on["images_per_s"]), float(off["images_per_s"])  # type: ignore[arg-type]
    return {
        "size": SIZE,
        "requests_per_burst": args.requests,
        "rounds": args.rounds,
        "server_threads": args.threads,
        "batching_on": on,
        "batching_off": off,
        "ratio_on_over_off": round(on_rate / off_rate, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=16, help="requests sent at once (default 16)")
    parser.add_argument("--rounds", type=int, default=5, help="measured bursts per mode; the median counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server and client to cores")
    args = parser.parse_args()

    result = asyncio.run(_main(args))
    on, off = result["batching_on"], result["batching_off"]
    print(f"batching on : {on['images_per_s']:.2f} images/s")  # type: ignore[index]
    print(f"batching off: {off['images_per_s']:.2f} images/s")  # type: ignore[index]
    print(f"ratio       : {result['ratio_on_over_off']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
