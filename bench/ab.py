"""Two versions of the gateway side by side: CPU per request of each, in alternating wrk runs.

Run with `.venv/bin/python bench/ab.py OLD NEW [--connections 1] [--rounds 16] [--duration 3]`, where
OLD and NEW are git revisions (NEW may be `.`, the working tree). Needs `wrk` and `nginx`, as
bench/overhead.py does.

Each revision is checked out in a temporary git worktree and served by `quotagate serve` on the first
core, both against one redis-server and one nginx stub upstream on the second core, with the same paid
key. wrk then runs against each in turn, the order alternating, and the median of each one's server
CPU per request is printed. What one change is worth, measured where noise hits both alike; on this
shared machine medians of 16 runs still move by a few per cent from one invocation to the next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from overhead import QUOTAS, ROOT, SECRET, Target, cores, make_keys, need, run_wrk, spawn, stub_command, wait_answering

sys.path.insert(0, str(ROOT))

import redis as redis_py  # noqa: E402

from gateway.ops.embedded_redis import RedisServer  # noqa: E402
from tests.ports import free_port  # noqa: E402


@contextlib.contextmanager
def checked_out(revision: str, where: Path) -> Iterator[Path]:
    """The tree of `revision` (`.`: the working tree itself), for as long as the block runs."""
    if revision == ".":
        yield ROOT
        return
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), revision], check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    args = parser.parse_args(argv)
    server_core, load_core, _ = cores()
    nginx = need("nginx")
    need("wrk")
    cpu: dict[str, list[float]] = {"old": [], "new": []}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qg-ab-")))
        trees = {
            "old": stack.enter_context(checked_out(args.old, tmp / "old")),
            "new": stack.enter_context(checked_out(args.new, tmp / "new")),
        }
        redis = RedisServer(tmp / "redis", port=free_port())
        redis.start()
        stack.callback(redis.stop)
        with redis_py.Redis.from_url(redis.url) as admin:
            os.sched_setaffinity(int(admin.info("server")["process_id"]), {int(load_core)})
        stub_port = free_port()
        stub = spawn(load_core, *stub_command(tmp, nginx, stub_port))
        stack.callback(stop, stub)
        stub_url = f"http://127.0.0.1:{stub_port}"
        wait_answering(stub_url, stub)
        paid_key, _ = asyncio.run(make_keys(redis.url))
        quotas = tmp / "quotas.yaml"
        quotas.write_text(QUOTAS)
        targets = []
        for name, tree in trees.items():
            port = free_port()
            gateway = spawn(
                server_core, sys.executable, "-m", "gateway.ops.cli", "serve", "--config", str(quotas),
                "--redis-url", redis.url, "--upstream", f"diffusion={stub_url}", "--port", str(port),
                env={"QUOTAGATE_KEY_SECRET": SECRET, "PYTHONPATH": str(tree)}, log=tmp / f"{name}.log", cwd=tree,
            )  # fmt: skip
            stack.callback(stop, gateway)
            wait_answering(f"http://127.0.0.1:{port}/healthz", gateway)
            targets.append(
                Target(name, f"http://127.0.0.1:{port}", [gateway.pid], {"Authorization": f"Bearer {paid_key}"})
            )
        for target in targets:  # warm-up
            run_wrk(load_core, tmp, target, args.connections, 1.0)
        for round_ in range(args.rounds):
            for target in targets if round_ % 2 == 0 else reversed(targets):
                run = run_wrk(load_core, tmp, target, args.connections, args.duration)
                if run["unexpected_status"]:
                    sys.exit(f"bench/ab.py: {target.name} answered {run['unexpected_status']} requests unexpectedly")
                cpu[target.name].append(run["server_cpu_us"])
    for name, revision in (("old", args.old), ("new", args.new)):
        runs = " ".join(f"{value:.0f}" for value in cpu[name])
        print(f"{name} ({revision}): median {statistics.median(cpu[name]):.0f} µs of CPU a request; runs: {runs}")
    print(f"new / old: {statistics.median(cpu['new']) / statistics.median(cpu['old']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
