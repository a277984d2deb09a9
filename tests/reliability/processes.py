"""Real gateway, backend and stub processes for fault tests: started, awaited, killed, their logs kept.

Every process writes its stdout and stderr to a log file under the test's temp dir; `ServiceSet.logs()`
hands them all to the security test, which reads every line for secrets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
SECRET = "reliability-secret-of-32-bytes!!"


@dataclass
class Service:
    """One child process serving HTTP on `url`."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def wait_ready(self, path: str = "/healthz", timeout: float = START_TIMEOUT) -> None:
        """Poll `path` until it answers 200; fail with the log if the process exits or never answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer {path} within {timeout:.0f}s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class ServiceSet:
    """The processes one test started, stopped together at its end."""

    tmp: Path
    services: list[Service] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # API keys and tokens that must never be logged

    def spawn(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None) -> Service:
        log = self.tmp / f"{name}.log"
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with open(log, "ab") as out:
            process = subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        service = Service(name, process, f"http://127.0.0.1:{port}", log)
        self.services.append(service)
        return service

    def gateway(
        self,
        name: str,
        config: Path,
        redis_url: str,
        upstream: str,
        env: dict[str, str] | None = None,
        *extra: str,
    ) -> Service:
        """`quotagate serve` on a free port (not yet awaited: call wait_ready, or start several first)."""
        port = free_port()
        command = [sys.executable, "-m", "gateway.ops.cli", "serve", "--config", str(config), "--redis-url", redis_url]
        command += ["--upstream", f"diffusion={upstream}", "--port", str(port), *extra]
        return self.spawn(name, command, port, {"QUOTAGATE_KEY_SECRET": SECRET, **(env or {})})

    def stub_upstream(self, name: str = "stub") -> Service:
        """The stub image service; the headers it receives go to `<tmp>/<name>.seen.jsonl`."""
        port = free_port()
        command = [sys.executable, "-m", "tests.reliability.stub_upstream", str(port)]
        return self.spawn(name, command, port, {"STUB_SEEN_FILE": str(self.tmp / f"{name}.seen.jsonl")})

    def backend(self, model: Path, *extra: str) -> Service:
        """`quotagate-backend serve` on the tiny model."""
        port = free_port()
        command = [sys.executable, "-m", "backend.cli", "serve", "--model", str(model), "--port", str(port)]
        command += ["--device", "cpu", "--threads", "1", "--log-level", "warning", *extra]
        return self.spawn("backend", command, port)

    def logs(self) -> dict[str, str]:
        return {service.name: service.log.read_text(errors="replace") for service in self.services}

    def stop(self) -> None:
        for service in self.services:
            service.stop()
