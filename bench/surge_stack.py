"""The processes of one surge run: redis-server, the image services, and the gateway replicas of one revision.

Each gateway replica is `quotagate serve` (one worker) from the revision's tree, alone on the first core with
the other replicas; the image services, redis-server and the load generator share the second core. Replicas
can be added and SIGKILLed while the load runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_py
from overhead import SECRET, cpu_seconds, process_tree, spawn, wait_answering

from gateway.ops.embedded_redis import RedisServer
from tests.ports import free_port

BENCH = Path(__file__).resolve().parent

PLANS = """\
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
"""


def quotas(pool: dict[str, int | float]) -> str:
    """The bench's quota file with `pools: diffusion:` set to `pool`."""
    lines = [f"    {name}: {value}" for name, value in pool.items()]
    return PLANS + "pools:\n  diffusion:\n" + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ServiceSettings:
    """What each image service can do: `slots` images at once, `service_ms` each (± `jitter` of it), `queue` more
    waiting; with `hold_overflow` it holds what it is sent past that rather than refusing it."""

    slots: int
    service_ms: float
    jitter: float
    queue: int
    hold_overflow: bool

    @property
    def capacity(self) -> int:
        return self.slots + self.queue

    @property
    def images_per_s(self) -> float:
        return self.slots * 1000 / self.service_ms


@dataclass
class Replica:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    pids: list[int] = field(default_factory=list)
    cpu_s: float | None = None  # what it used, read as it was killed


class Stack:
    """redis-server, `services` image services and the gateway replicas of the tree at `tree`."""

    def __init__(self, tmp: Path, tree: Path, cores: tuple[str, str], env: dict[str, str]) -> None:
        self._tmp = tmp
        self._tree = tree
        self._server_core, self._load_core = cores
        self._env = env
        self.redis = RedisServer(tmp / "redis", port=free_port())
        self.services: list[Replica] = []
        self.replicas: list[Replica] = []
        self._quotas = tmp / "quotas.yaml"
        self._processes: list[subprocess.Popen[bytes]] = []
        self.redis_pid = 0

    def start(self, settings: ServiceSettings, services: int, pool: dict[str, int | float], replicas: int) -> None:
        self.redis.start()
        with redis_py.Redis.from_url(self.redis.url) as admin:
            self.redis_pid = int(admin.info("server")["process_id"])
        os.sched_setaffinity(self.redis_pid, {int(self._load_core)})
        service_env = {
            "BENCH_SLOTS": str(settings.slots),
            "BENCH_SERVICE_MS": str(settings.service_ms),
            "BENCH_JITTER": str(settings.jitter),
            "BENCH_QUEUE": str(settings.queue),
            "BENCH_OVERFLOW": "hold" if settings.hold_overflow else "refuse",
        }
        uvicorn = [sys.executable, "-m", "uvicorn", "--no-access-log", "--log-level", "warning", "--factory"]
        for i in range(services):
            port = free_port()
            process = spawn(self._load_core, *uvicorn, "--app-dir", str(BENCH), "--port", str(port),
                            "servers:capacity_app", env=service_env)  # fmt: skip
            self._processes.append(process)
            self.services.append(Replica(f"service {i + 1}", f"http://127.0.0.1:{port}", process, [process.pid]))
        for service in self.services:
            wait_answering(f"{service.url}/healthz", service.process)
        self._quotas.write_text(quotas(pool))
        for _ in range(replicas):
            self.add_replica()

    def add_replica(self, *, gently: bool = False) -> Replica:
        """Start one more gateway replica and wait until it answers.

        `gently`: it starts at the lowest CPU priority, and is raised to the others' once it answers. A real
        replica starts on a host of its own; here it shares one core with the replicas already serving, and
        its start (imports, ~2 s of CPU) would otherwise be their stall.
        """
        port = free_port()
        name = f"gateway {len(self.replicas) + 1}"
        upstreams = ",".join(service.url for service in self.services)
        command = [
            *(sys.executable, "-m", "gateway.ops.cli", "serve", "--config", str(self._quotas)),
            *("--redis-url", self.redis.url, "--upstream", f"diffusion={upstreams}", "--port", str(port)),
        ]
        process = spawn(
            self._server_core,
            *(["nice", "-n", "19", *command] if gently else command),
            env={"QUOTAGATE_KEY_SECRET": SECRET, "PYTHONPATH": str(self._tree), **self._env},
            log=self._tmp / f"{name.replace(' ', '-')}.log",
            cwd=self._tree,
        )
        self._processes.append(process)
        wait_answering(f"http://127.0.0.1:{port}/healthz", process, timeout=60.0)
        replica = Replica(name, f"http://127.0.0.1:{port}", process, process_tree(process.pid))
        if gently:
            for pid in replica.pids:
                os.setpriority(os.PRIO_PROCESS, pid, 0)
        self.replicas.append(replica)
        return replica

    async def add_replica_async(self) -> Replica:
        """`add_replica(gently=True)` in a thread, while the load runs."""
        return await asyncio.to_thread(self.add_replica, gently=True)

    def kill(self, replica: Replica) -> None:
        """SIGKILL the replica: no shutdown, its places and connections left as they were."""
        replica.cpu_s = cpu_seconds(replica.pids)
        for pid in replica.pids:
            os.kill(pid, signal.SIGKILL)
        replica.process.wait(10)

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far: the gateway replicas together, the image services, redis-server."""
        gateways = sum(r.cpu_s if r.cpu_s is not None else cpu_seconds(r.pids) for r in self.replicas)
        return {
            "gateways": gateways,
            "image services": sum(cpu_seconds(s.pids) for s in self.services),
            "redis-server": cpu_seconds([self.redis_pid]),
        }

    def gateway_log_tail(self, lines: int = 20) -> dict[str, Any]:
        """What each replica logged above `info` (requests are logged at info): how many lines, and the last ones."""
        tails: dict[str, Any] = {}
        for log in sorted(self._tmp.glob("gateway-*.log")):
            notable = [line for line in log.read_text(errors="replace").splitlines() if '"level":"info"' not in line]
            tails[log.stem] = {"lines": len(notable), "last": notable[-lines:]}
        return tails

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.redis.stop()
