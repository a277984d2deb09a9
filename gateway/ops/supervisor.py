"""`quotagate serve`: uvicorn, except that SIGHUP reloads the quota file in every worker.

uvicorn's supervisor answers SIGHUP by replacing each worker process; the gateway reloads its
config in place instead (gateway/config/reload.py), so connections and requests in flight are untouched
and a bad file is refused without restarting anything.
"""

from __future__ import annotations

import contextlib
import os
import signal

import uvicorn
from uvicorn.supervisors import Multiprocess


class _ReloadingSupervisor(Multiprocess):
    def handle_hup(self) -> None:
        # A worker ignores SIGHUP from the moment it builds the app, re-reads the file once its
        # handler is in place, and reloads on every SIGHUP after that. One caught earlier still,
        # before it serves anything, dies of it and is started again by uvicorn, on the new file.
        for process in self.processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)


# uvicorn's own X-Forwarded-For rewriting is off: the gateway believes it only from
# QUOTAGATE_TRUSTED_PROXIES (gateway/admission/peers.py), and must see the socket's peer to decide that.
PROXY_HEADERS = False


def serve(*, host: str, port: int, workers: int) -> None:
    """Serve `gateway.app:app_from_env` until SIGINT or SIGTERM."""
    config = uvicorn.Config(
        "gateway.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=PROXY_HEADERS,
        access_log=False,
        log_level="warning",
    )
    if workers == 1:  # one process: it takes SIGHUP itself
        uvicorn.Server(config).run()
        return
    _ReloadingSupervisor(config, sockets=[config.bind_socket()]).run()
