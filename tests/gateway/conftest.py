"""Gateway fixtures: a stub upstream on a real socket, and a gateway's config over the real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config.quotas import Config, parse_config
from tests.support.quotas import QUOTAS
from tests.support.quotas import quota_file as write_quota_file
from tests.support.upstream import StubUpstream, serve_in_thread


@pytest.fixture(scope="session")
def _stub_server() -> Iterator[StubUpstream]:
    stub = StubUpstream()
    with serve_in_thread(stub.app()) as stub.url:
        yield stub


@pytest.fixture
def upstream(_stub_server: StubUpstream) -> Iterator[StubUpstream]:
    """The stub upstream, reset to answering 200 at once."""
    _stub_server.status = 200
    _stub_server.extra_headers = {}
    _stub_server.seen.clear()
    _stub_server.gate, _stub_server.split = None, False
    yield _stub_server
    if _stub_server.gate is not None:
        _stub_server.gate.set()  # let answers still held go


@pytest.fixture
def config() -> Config:
    return parse_config(QUOTAS, source="quotas.yaml")


@pytest.fixture
def quota_file(tmp_path: Path) -> Path:
    """QUOTAS in a file, for gateways that read (and reload) it."""
    return write_quota_file(tmp_path)
