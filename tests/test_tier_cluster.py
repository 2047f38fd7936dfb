"""A Valkey cluster is not supported as the shared tier: a `[shared] url` that names a cluster
node is refused at start-up when the node answers then, else as soon as it does (the tier off
for good, the gateway on its own)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ntonix.tier import CLUSTER_REFUSED
from tests.conftest import StartGatewayWith, StartMock
from tests.shared_support import ValkeyServer, tier_config, tier_toml
from tests.support import SERVE, Spawn, chat, eventually
from tests.test_shared_tier import tier_up

CLUSTER = ("--cluster-enabled", "yes")


@pytest.fixture
async def node(spawn: Spawn) -> AsyncIterator[ValkeyServer]:
    """A valkey-server in cluster mode, not started."""
    server = ValkeyServer(spawn)
    yield server
    shutil.rmtree(server.directory, ignore_errors=True)


async def test_a_cluster_node_that_answers_at_start_is_refused_with_a_clear_message(
    spawn: Spawn, tmp_path: Path, start_mock: StartMock, node: ValkeyServer
) -> None:
    mock = await start_mock()
    await node.start(*CLUSTER)
    config = tmp_path / "ntonix.toml"
    config.write_text(tier_toml(mock.url, node.url))
    gateway = await spawn(*SERVE, "--config", str(config))

    assert await gateway.process.wait() != 0
    assert f"Cannot start: {CLUSTER_REFUSED}".encode() in gateway.output


async def test_a_cluster_node_that_answers_later_turns_the_tier_off_for_good(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    node: ValkeyServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mock = await start_mock()
    with caplog.at_level(logging.ERROR, logger="ntonix.shared"):
        gateway = await start_gateway_with(tier_config(mock.url, node.url))  # nothing there yet
        await node.start(*CLUSTER)

        async def refused() -> bool:
            return any(CLUSTER_REFUSED in record.getMessage() for record in caplog.records)

        await eventually(refused)
        answer = await client.post(f"{gateway}/v1/chat/completions", json=chat("alone"))

    assert answer.status_code == 200
    assert await tier_up(client, gateway) == 0
    assert sum(CLUSTER_REFUSED in record.getMessage() for record in caplog.records) == 1
