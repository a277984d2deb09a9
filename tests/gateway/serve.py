"""Real gateway processes for tests: `quotagate serve` as ops runs it, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.ports import free_port

from .conftest import SECRET

BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def logged(self) -> str:
        """What the gateway wrote to stderr so far."""
        return self.log.read_text()

    def version(self) -> str:
        return str(httpx.get(f"{self.url}/readyz", timeout=5).json()["config_version"])

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample from /metrics, or None if it is not there."""
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


@contextmanager
def gateway_processes(
    count: int,
    config: Path,
    redis_url: str,
    upstream_url: str,
    log_dir: Path,
    *,
    workers: int = 1,
    args: tuple[str, ...] = (),
    terminal: int | None = None,
    **env: str,
) -> Iterator[list[GatewayProcess]]:
    """`count` running `quotagate serve` processes, started together and each ready; stopped at exit.

    `args` are more options of `serve`; `terminal`, a pty's file descriptor, takes their output instead of the log.
    """
    gateways: list[GatewayProcess] = []
    try:
        for _ in range(count):
            gateways.append(_spawn(config, redis_url, upstream_url, log_dir, workers, args, terminal, env))
        deadline = time.monotonic() + START_TIMEOUT
        for gateway in gateways:
            _wait_ready(gateway, deadline, workers)
        yield gateways
    finally:
        for gateway in gateways:
            gateway.process.send_signal(signal.SIGTERM)
        for gateway in gateways:
            try:
                gateway.process.wait(15)
            except subprocess.TimeoutExpired:
                gateway.process.kill()
                gateway.process.wait()


def _spawn(
    config: Path,
    redis_url: str,
    upstream_url: str,
    log_dir: Path,
    workers: int,
    args: tuple[str, ...],
    terminal: int | None,
    env: dict[str, str],
) -> GatewayProcess:
    port = free_port()
    log = log_dir / f"gateway-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                BIN / "quotagate", "serve", "--config", config, "--redis-url", redis_url,
                "--upstream", f"diffusion={upstream_url}", "--port", str(port), "--workers", str(workers), *args,
            ],
            env={**os.environ, "QUOTAGATE_KEY_SECRET": SECRET.decode(), **env},
            stdout=out if terminal is None else terminal,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return GatewayProcess(process, f"http://127.0.0.1:{port}", log)


def _wait_ready(gateway: GatewayProcess, deadline: float, workers: int) -> None:
    """Wait until each of the gateway's `workers` processes has answered /readyz on a fresh connection."""
    seen: set[int] = set()
    while len(seen) < workers:
        assert gateway.process.poll() is None, f"the gateway exited: {gateway.logged()}"
        assert time.monotonic() < deadline, f"the gateway was not ready in {START_TIMEOUT:.0f}s: {gateway.logged()}"
        try:
            answer = httpx.get(f"{gateway.url}/readyz", timeout=1)
            if answer.status_code == 200:
                seen.add(answer.json()["worker"])
        except httpx.TransportError:
            pass
        if len(seen) < workers:
            time.sleep(0.05)
