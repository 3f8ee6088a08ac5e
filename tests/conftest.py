"""Shared fixtures: a real Prosody and real storage nodes, started once per session.

``cluster`` runs two storage nodes: ``node1`` owns ``/`` and ``node2`` owns
``/sharded``. Tests that only read and write use it through ``kv`` and keep to
their own ``prefix``; tests that kill or restart processes build their own
cluster with ``make_cluster`` so they disturb nobody else.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kvstore.client import Client
from kvstore.devcluster import DevCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    dev = DevCluster(tmp_path_factory.mktemp("cluster"), shards=["/", "/sharded"],
                     log_level="warning")
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., DevCluster]]:
    """Build a private cluster (stopped at the end of the test)."""
    started: list[DevCluster] = []

    def make(shards: list[str] | None = None, **kwargs: object) -> DevCluster:
        dev = DevCluster(tmp_path / f"cluster{len(started)}", shards=shards or ["/"],
                         log_level="warning", **kwargs)  # type: ignore[arg-type]
        dev.start()
        started.append(dev)
        return dev

    yield make
    for dev in started:
        dev.stop()


@pytest_asyncio.fixture
async def kv(cluster: DevCluster) -> AsyncIterator[Client]:
    client = Client(cluster.settings())
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of the test's own under ``/t``: tests sharing a cluster never collide."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]
    return f"/t/{name}-{uuid.uuid4().hex[:8]}"
