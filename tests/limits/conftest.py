"""Fixtures for the limits tests: a real three-master Redis Cluster, started once, flushed before each test.

If the cluster cannot be started the tests that need it fail: they never skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.limits.cluster import LocalCluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    """`redis+cluster://` URL of a running, empty three-master cluster."""
    redis_cluster.flush()
    return redis_cluster.url
