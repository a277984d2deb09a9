"""The gateway's own Python per request, with no sockets to the client: where overhead.py's CPU goes.

Run with `.venv/bin/python bench/hotpath.py [--path 429|allowed] [--requests N] [--profile]`.
Needs `nginx` (Debian's; `make bench` installs it) as the upstream of the `allowed` path.

The gateway app is called in-process as uvicorn would call it (an ASGI scope, `receive`, `send`), one
request after another, against a real redis-server and a real upstream (an nginx stub on the other
core); the figure is this process's CPU per request (`time.process_time`). The client's socket, its
HTTP parsing and uvicorn's own work are not in it; the Redis and upstream round trips are, one at a
time (nothing is coalesced: expect more per request than a loaded server spends). `--profile` prints
cProfile's 40 costliest functions by cumulative time. The event loop is asyncio's own (uvicorn uses
uvloop when it is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from overhead import BODY, PATH, QUOTAS, SECRET, cores, need, spawn, stub_command, wait_answering  # noqa: E402

from gateway.admission.identity import KeyStore  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.config.quotas import load_config  # noqa: E402
from gateway.config.settings import Settings  # noqa: E402
from gateway.observe.logs import configure_logging  # noqa: E402
from gateway.ops.embedded_redis import RedisServer  # noqa: E402
from limits import connect  # noqa: E402
from tests.ports import free_port  # noqa: E402


async def measure(tmp: Path, upstream: str, redis_url: str, path: str, requests: int, profile: bool) -> float:
    quotas = tmp / "quotas.yaml"
    quotas.write_text(QUOTAS)
    settings = Settings(
        config_path=str(quotas),
        redis_url=redis_url,
        key_secret=SECRET.encode(),
        upstreams=MappingProxyType({"diffusion": (upstream,)}),
    )
    redis = connect(redis_url)
    try:
        store = KeyStore(redis, SECRET.encode())
        key = await store.create_key("hot-free", "free") if path == "429" else await store.create_key("hot", "bench")
    finally:
        await redis.aclose()
    app = create_app(settings, load_config(str(quotas)))
    headers = [
        (b"host", b"gateway"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
        (b"authorization", f"Bearer {key}".encode()),
    ]
    scope = {"type": "http", "method": "POST", "path": PATH, "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 40000), "http_version": "1.1", "scheme": "http", "root_path": ""}  # fmt: skip
    statuses: list[int] = []

    async def one() -> None:
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if body_sent:  # after the body, the next message is the client leaving: never, here
                await asyncio.Event().wait()
            body_sent = True
            return {"type": "http.request", "body": BODY.encode(), "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(scope), receive, send)

    async with app.app.router.lifespan_context(app.app):
        for _ in range(10 if path == "allowed" else 4):  # warm up; on the 429 path, spend the day
            await one()
        statuses.clear()
        profiler = cProfile.Profile() if profile else None
        started = time.process_time()
        if profiler:
            profiler.enable()
        for _ in range(requests):
            await one()
        if profiler:
            profiler.disable()
        used = time.process_time() - started
    expected = 429 if path == "429" else 200
    if statuses.count(expected) != requests:
        raise RuntimeError(f"expected {requests} answers {expected}, got {sorted(set(statuses))}")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    return used / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", choices=("429", "allowed"), default="429", help="an exhausted account, or a paid one")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true", help="print cProfile's costliest functions")
    args = parser.parse_args(argv)
    server_core, load_core, _ = cores()
    nginx = need("nginx")
    with tempfile.TemporaryDirectory(prefix="qg-hotpath-") as tmp:
        stub_port = free_port()
        stub = spawn(load_core, *stub_command(Path(tmp), nginx, stub_port))
        redis = RedisServer(Path(tmp) / "redis", port=free_port())
        try:
            wait_answering(f"http://127.0.0.1:{stub_port}", stub)
            redis.start()
            os.sched_setaffinity(0, {int(server_core)})
            configure_logging("json", open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
            per_request = asyncio.run(
                measure(Path(tmp), f"http://127.0.0.1:{stub_port}", redis.url, args.path, args.requests, args.profile)
            )
        finally:
            stub.terminate()
            stub.wait(10)
            redis.stop()
    print(f"{args.path} path: {per_request:.1f} µs of gateway CPU per request ({args.requests:,} requests, no sockets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
