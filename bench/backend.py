"""Backend throughput with dynamic batching on vs off, measured in one run.

Starts two `quotagate-backend serve` processes on loopback with the tiny model at 64x64, one with batching
on and one with it off, sends them bursts of 16 single-image requests at once, alternating, and prints
images/s for each (median burst) and their ratio.
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


async def _mean_batch(client: httpx.AsyncClient) -> float:
    """Mean images per pipeline call so far, from the server's own histogram."""
    samples: dict[str, float] = {}
    for line in (await client.get("/metrics")).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("quotagate_backend_batch_images_sum", "quotagate_backend_batch_images_count"):
            samples[name] = float(value)
    count = samples.get("quotagate_backend_batch_images_count", 0.0)
    return samples.get("quotagate_backend_batch_images_sum", 0.0) / count if count else 0.0


def _summary(batching: str, requests: int, times: list[float], mean_batch: float) -> dict[str, object]:
    return {
        "batching": batching,
        "images_per_s": round(requests / statistics.median(times), 2),
        "mean_images_per_call": round(mean_batch, 2),
        "burst_seconds": [round(t, 4) for t in times],
    }


async def _main(args: argparse.Namespace) -> dict[str, object]:
    from backend.tiny_model import make_tiny_model

    modes = ("on", "off")
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        if args.pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
        ports = {mode: _free_port() for mode in modes}
        servers = {mode: _start_server(model, ports[mode], mode, args.threads, args.pin) for mode in modes}
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        limits = httpx.Limits(max_connections=args.requests)
        try:
            clients = {
                mode: httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[mode]}", timeout=120, limits=limits)
                for mode in modes
            }
            for mode in modes:
                await _wait_ready(clients[mode], servers[mode])
                await _burst(clients[mode], args.requests)  # warm-up: connections, allocator, batch shapes
            # Alternate the modes, one burst at a time, so that a noisy neighbour hurts both alike.
            for _ in range(args.rounds):
                for mode in modes:
                    times[mode].append(await _burst(clients[mode], args.requests))
            mean_batch = {mode: await _mean_batch(clients[mode]) for mode in modes}
            for client in clients.values():
                await client.aclose()
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(timeout=30)
    on = _summary("on", args.requests, times["on"], mean_batch["on"])
    off = _summary("off", args.requests, times["off"], mean_batch["off"])
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
    parser.add_argument("--rounds", type=int, default=9, help="measured bursts per mode; the median counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server and client to cores")
    args = parser.parse_args()

    result = asyncio.run(_main(args))
    on, off = result["batching_on"], result["batching_off"]
    for label, mode in (("on ", on), ("off", off)):
        print(
            f"batching {label}: {mode['images_per_s']:.2f} images/s"  # type: ignore[index]
            f" ({mode['mean_images_per_call']} images per pipeline call)"  # type: ignore[index]
        )
    print(f"ratio       : {result['ratio_on_over_off']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
