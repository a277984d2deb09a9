"""Run `quotagate serve` as a real process, for tests of what only a process shows (workers, logs, ports)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from tests.ports import free_port

from .conftest import QUOTAS, SECRET

START_TIMEOUT = 30.0


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    port: int

    def stop(self) -> None:
        """SIGTERM, as systemd sends it; wait for a clean exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def serve(
    tmp_path: Path,
    redis_url: str,
    upstream_url: str,
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    stderr: int | IO[bytes] | None = subprocess.PIPE,
) -> Iterator[Served]:
    """`quotagate serve` on a free port with the test quotas, ready (its /readyz answered 200)."""
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS)
    port = free_port()
    environ = {
        **os.environ,
        "QUOTAGATE_CONFIG": str(config),
        "QUOTAGATE_REDIS_URL": redis_url,
        "QUOTAGATE_KEY_SECRET": SECRET.decode(),
        "QUOTAGATE_UPSTREAMS": f"diffusion={upstream_url}",
        **(env or {}),
    }
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), *args]
    process = subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL, stderr=stderr)
    served = Served(process, f"http://127.0.0.1:{port}", port)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, f"quotagate serve exited with {process.returncode}"
            assert time.monotonic() < deadline, "quotagate serve was not ready in time"
            try:
                if httpx.get(f"{served.url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield served
    finally:
        served.stop()
        if process.stderr is not None:
            process.stderr.close()
