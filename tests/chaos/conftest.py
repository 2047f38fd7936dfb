"""Fixtures of the chaos tests: three namespaces, a mock in each, a gateway in front.

The tests marked `chaos` run only when NTONIX_CHAOS=1 (`nox -s chaos`); the others are the fast
subset that `nox -s tests` runs too. All of them are skipped where namespaces cannot be made
(not root, no iproute2), saying why.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos import netns
from tests.chaos.harness import Cluster, start_cluster
from tests.support import Spawn

_UNAVAILABLE = netns.available()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: a long fault-injection test, run by `nox -s chaos` (NTONIX_CHAOS=1)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos/" not in item.nodeid:
            continue
        if _UNAVAILABLE:
            item.add_marker(pytest.mark.skip(reason=_UNAVAILABLE))
        elif item.get_closest_marker("chaos") and os.environ.get("NTONIX_CHAOS") != "1":
            item.add_marker(pytest.mark.skip(reason="a chaos test: run `nox -s chaos`"))


@pytest.fixture
def nodes() -> Iterator[list[netns.Node]]:
    with netns.Topology(3) as made:
        yield made


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=15, limits=limits) as client:
        yield client


@pytest.fixture
async def cluster(
    spawn: Spawn, nodes: list[netns.Node], client: httpx.AsyncClient, tmp_path: Path
) -> Cluster:
    return await start_cluster(spawn, nodes, client, tmp_path)
