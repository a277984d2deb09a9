"""Real processes for tests: `quotagate serve`, `quotagate up`, the backend and the stub image service.

Every process writes its stdout and stderr to a log file under the test's temp dir (`ServiceSet.logs()` hands
them all to the security check, which reads every line for secrets). Each is awaited by `wait_ready`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.ports import free_port

from .keys import SECRET, create_key

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def wait_ready(
    process: subprocess.Popen[bytes] | subprocess.Popen[str],
    url: str,
    logged: Callable[[], str],
    *,
    path: str = "/healthz",
    timeout: float = START_TIMEOUT,
    workers: int = 1,
) -> None:
    """Poll `url + path` until it answers 200 (from `workers` distinct worker processes, each on a fresh
    connection, when there are several); fail with the log if the process exits or never answers."""
    seen: set[object] = set()
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}:\n{logged()}")
        try:
            answer = httpx.get(url + path, timeout=1)
            if answer.status_code == 200:
                seen.add(answer.json()["worker"] if workers > 1 else None)
        except httpx.HTTPError:
            pass
        if len(seen) >= workers:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{url} did not answer {path} within {timeout:.0f}s:\n{logged()}")
        time.sleep(0.05)


@dataclass
class Service:
    """One child process serving HTTP on `url`."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def logged(self) -> str:
        """What the process wrote so far."""
        return self.log.read_text(errors="replace")

    def wait_ready(self, path: str = "/healthz", timeout: float = START_TIMEOUT, workers: int = 1) -> None:
        wait_ready(self.process, self.url, self.logged, path=path, timeout=timeout, workers=workers)

    def wait_logged(self, text: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until the process has written `text`; fail with the log if it exits first or never does."""
        deadline = time.monotonic() + timeout
        while text not in self.logged():
            if self.process.poll() is not None or time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name} never wrote {text!r}:\n{self.logged()}")
            time.sleep(0.05)

    def version(self) -> str:
        """The config version a gateway serves."""
        return str(httpx.get(f"{self.url}/readyz", timeout=5).json()["config_version"])

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample from /metrics, or None if it is not there."""
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def send(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def reap(self, timeout: float = STOP_TIMEOUT) -> None:
        """Wait for the process to exit after a signal; kill it if it does not in time."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        self.send(signum)
        self.reap(timeout)


@dataclass
class ServiceSet:
    """The processes one test started, stopped together at its end."""

    tmp: Path
    services: list[Service] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # API keys and tokens that must never be logged

    def spawn(
        self, name: str, command: list[str], port: int, env: dict[str, str] | None = None, terminal: int | None = None
    ) -> Service:
        """`command` started, its output in `<tmp>/<name>.log` (or on `terminal`, a pty's file descriptor)."""
        log = self.tmp / f"{name}.log"
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command,
                env=environment,
                stdout=out if terminal is None else terminal,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        service = Service(name, process, f"http://127.0.0.1:{port}", log)
        self.services.append(service)
        return service

    def gateway(
        self,
        name: str | None,
        config: Path,
        redis_url: str,
        upstream: str,
        env: dict[str, str] | None = None,
        *extra: str,
        terminal: int | None = None,
        installed: bool = False,
    ) -> Service:
        """`quotagate serve` on a free port (not yet awaited: call wait_ready, or start several first).

        `installed` runs the installed `quotagate` script rather than `python -m gateway.ops.cli`: the
        two start their worker processes differently, and each suite keeps the one it was written for.
        """
        port = free_port()
        program = [str(BIN / "quotagate")] if installed else [sys.executable, "-m", "gateway.ops.cli"]
        command = [*program, "serve", "--config", str(config), "--redis-url", redis_url]
        command += ["--upstream", f"diffusion={upstream}", "--port", str(port), *extra]
        environment = {"QUOTAGATE_KEY_SECRET": SECRET.decode(), **(env or {})}
        return self.spawn(name or f"gateway-{port}", command, port, environment, terminal)

    def up(self, config: Path, data_dir: Path, admin_port: int) -> Service:
        """`quotagate up`: redis-server, the backend and the gateway under one supervisor (await its banner)."""
        port = free_port()
        command = [str(BIN / "quotagate"), "up", "--config", str(config), "--port", str(port)]
        command += ["--data-dir", str(data_dir), "--admin-port", str(admin_port)]
        return self.spawn("up", command, port)

    def stub_upstream(self, name: str = "stub", *, capacity: int | None = None) -> Service:
        """The stub image service in its own process; the headers it receives go to `<tmp>/<name>.seen.jsonl`.
        With `capacity` it advertises that many images; without, nothing (its capacity is learned)."""
        port = free_port()
        command = [sys.executable, "-m", "tests.support.upstream", str(port), "answer"]
        env = {"STUB_SEEN_FILE": str(self.tmp / f"{name}.seen.jsonl")}
        if capacity is not None:
            env["STUB_CAPACITY"] = str(capacity)
        return self.spawn(name, command, port, env)

    def capacity_backend(self, slots: int, queue: int, rate: float, name: str = "capacity") -> Service:
        """An image service that advertises `slots` + `queue` images at `rate` a second and counts what it holds
        (tests/support/capacity_backend.py)."""
        port = free_port()
        command = [sys.executable, "-m", "tests.support.capacity_backend", str(port), str(slots), str(queue), str(rate)]
        return self.spawn(name, command, port)

    async def create_key(self, redis_url: str, account: str, plan: str) -> str:
        """A new API key, remembered so that the log check looks for it."""
        key = await create_key(redis_url, account, plan)
        self.secrets.append(key)
        return key

    def backend(self, model: Path, *extra: str) -> Service:
        """`quotagate-backend serve` on the tiny model."""
        port = free_port()
        command = [sys.executable, "-m", "backend.cli", "serve", "--model", str(model), "--port", str(port)]
        command += ["--device", "cpu", "--threads", "1", "--log-level", "warning", *extra]
        return self.spawn("backend", command, port)

    def stack(
        self, quotas: Path, redis_url: str, *backend_args: str, env: dict[str, str] | None = None
    ) -> tuple[Service, Service]:
        """The backend on the tiny model and a gateway before it, each ready: (gateway, backend)."""
        backend = self.backend(Path("tiny"), "--data-dir", str(self.tmp / "backend"), *backend_args)
        gateway = self.gateway("gateway", quotas, redis_url, backend.url, env)
        gateway.wait_ready()
        backend.wait_ready("/readyz", timeout=120)
        return gateway, backend

    def logs(self) -> dict[str, str]:
        return {service.name: service.logged() for service in self.services}

    def stop(self) -> None:
        """SIGTERM to all at once, then each awaited (killed if it does not exit in time)."""
        for service in self.services:
            service.send()
        for service in self.services:
            service.reap()


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
) -> Iterator[list[Service]]:
    """`count` running `quotagate serve` processes, started together and each ready; stopped at exit.

    `args` are more options of `serve`; `terminal`, a pty's file descriptor, takes their output instead of the log.
    """
    started = ServiceSet(log_dir)
    try:
        for _ in range(count):
            options = ("--workers", str(workers), *args)
            started.gateway(None, config, redis_url, upstream_url, env, *options, terminal=terminal, installed=True)
        for gateway in started.services:
            gateway.wait_ready("/readyz", workers=workers)
        yield started.services
    finally:
        started.stop()
