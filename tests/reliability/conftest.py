"""Reliability fixtures: real processes per test, and a check at every test's end that no secret was logged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.keys import SECRET
from tests.support.processes import ServiceSet
from tests.support.quotas import RELIABILITY_QUOTAS, quota_file


@pytest.fixture
def quotas(tmp_path: Path) -> Path:
    return quota_file(tmp_path, RELIABILITY_QUOTAS)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[ServiceSet]:
    """Processes started by the test; at its end they stop, and no key or secret may be in their logs."""
    started = ServiceSet(tmp_path)
    try:
        yield started
    finally:
        started.stop()
    secrets = [SECRET.decode(), *started.secrets]
    leaks = [
        f"{name}: {line[:200]}"
        for name, text in started.logs().items()
        for line in text.splitlines()
        if any(secret in line for secret in secrets)
    ]
    assert not leaks, "secrets in logs:\n" + "\n".join(leaks)
