"""A real `quotagate serve` process in front of a stub image service."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.processes import Service, gateway_processes
from tests.support.quotas import quota_file
from tests.support.upstream import StubUpstream, serve_in_thread


@contextmanager
def served(redis_url: str, tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[tuple[Service, StubUpstream]]:
    """One gateway process (the `free` and `pro` plans of tests/gateway) with `env` set, and the stub it forwards to."""
    stub = StubUpstream()
    with (
        serve_in_thread(stub.app()) as stub.url,
        gateway_processes(1, quota_file(tmp_path), redis_url, stub.url, tmp_path, **(env or {})) as (gateway,),
    ):
        yield gateway, stub
