"""Config reload without downtime: `ntonix serve --config F` as a user runs it, then F changes.

SIGHUP and `POST /ntonix/reload` re-read F: backends are added, removed (their streams in
flight finish) or re-weighted; an invalid F is refused and the running config keeps serving.
The gateway is a real child process; the mocks run in the test. The contract: issue 3 item 8,
SPEC section 3 (admin token) and docs/architecture.md (Reload).
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.conftest import RunningMock, StartMock
from tests.support import PYTHON, ChildProcess, Spawn, chat, eventually, sse_events, wait_until

CHAT = "/v1/chat/completions"
RUNNING_ON = rb"Running on (http://127\.0\.0\.1:\d+)"
RELOADED = rb"config reloaded from \S+: (\d+) backends"
REFUSED = b"config reload refused, keeping the running config"
ADMIN_TOKEN = "s3cret-admin"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
# About a second: long enough to reload while it runs. Other requests take 50 ms.
LONG_STREAM = {"x-mock-tokens": "20", "x-mock-token-delay": "0.05"}


@attrs.frozen
class Node:
    """One [[backends]] entry of the file."""

    name: str
    url: str
    weight: int = 1


@attrs.frozen
class ConfigFile:
    """The config file the gateway was started with, rewritten by the tests."""

    path: Path
    strategy: str = "least-connections"
    admin_token: str = ""

    def write(self, *nodes: Node, extra: str = "", failure_threshold: int = 3) -> None:
        lines = [
            "[balancer]",
            f'strategy = "{self.strategy}"',
            "[cache]",
            "enabled = false  # every request must reach a backend",
            "[health]",
            "interval = 0.2",
            "timeout = 0.5",
            f"failure_threshold = {failure_threshold}",
            "open_for = 0.5",
            "max_open_for = 2",
            "[auth]",
            f'admin_token = "{self.admin_token}"',
        ]
        for node in nodes:
            lines += [
                "[[backends]]",
                f'name = "{node.name}"',
                f'url = "{node.url}"',
                f"weight = {node.weight}",
            ]
        self.path.write_text("\n".join(lines) + "\n" + extra)


@attrs.frozen
class ServedGateway:
    """`ntonix serve` in a child process, and what a test does with it."""

    process: ChildProcess
    url: str
    config: ConfigFile
    client: httpx.AsyncClient

    @property
    def _admin(self) -> dict[str, str]:
        return ADMIN if self.config.admin_token else {}

    async def sighup(self) -> bytes:
        """kill -HUP; returns what the gateway logged about it (reloaded, or refused and why)."""
        logged = len(self.process.output)
        self.process.process.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while not re.search(RELOADED + b"|" + REFUSED, self.process.output[logged:]):
                await trio.sleep(0.01)
        await trio.sleep(0.05)  # the rest of a multi-line record
        return self.process.output[logged:]

    async def post_reload(self, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.post(f"{self.url}/ntonix/reload", headers=headers or self._admin)

    async def backends(self) -> dict[str, dict[str, Any]]:
        response = await self.client.get(f"{self.url}/ntonix/status", headers=self._admin)
        assert response.status_code == 200, response.text
        return {backend["name"]: backend for backend in response.json()["backends"]}

    async def answered_by(self, content: str = "Hello") -> str:
        response = await self.client.post(f"{self.url}{CHAT}", json=chat(content, stream=False))
        assert response.status_code == 200, response.text
        return response.headers["x-ntonix-backend"]

    async def spread(self, requests: int) -> Counter[str]:
        return Counter([await self.answered_by(f"q{index}") for index in range(requests)])


async def serve_gateway(
    spawn: Spawn, client: httpx.AsyncClient, config: ConfigFile, *nodes: Node
) -> ServedGateway:
    config.write(*nodes)
    process = await spawn(
        PYTHON, "-m", "ntonix.cli", "serve", "--config", str(config.path), "--bind", "127.0.0.1:0"
    )
    url = (await process.wait_for(RUNNING_ON)).group(1).decode()
    return ServedGateway(process, url, config, client)


def node(mock: RunningMock, weight: int = 1) -> Node:
    return Node(mock.mock.options.name, mock.url, weight)


async def test_sighup_adds_a_backend_that_then_takes_traffic(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn, client: httpx.AsyncClient
) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    gateway = await serve_gateway(spawn, client, ConfigFile(tmp_path / "ntonix.toml"), node(a))
    assert await gateway.spread(4) == {"a": 4}

    gateway.config.write(node(a), node(b))
    logged = await gateway.sighup()
    assert (reloaded := re.search(RELOADED, logged)) and reloaded.group(1) == b"2"
    assert set(await gateway.backends()) == {"a", "b"}
    assert await gateway.spread(6) == {"a": 3, "b": 3}
    assert b.stats["requests"] == 3


async def test_a_removed_backend_finishes_its_stream_in_flight_and_gets_nothing_new(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn, client: httpx.AsyncClient
) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    gateway = await serve_gateway(
        spawn, client, ConfigFile(tmp_path / "ntonix.toml"), node(a), node(b)
    )
    bodies: dict[str, bytes] = {}

    async def stream(content: str, started: trio.Event) -> None:
        request = client.build_request(
            "POST", f"{gateway.url}{CHAT}", json=chat(content), headers=LONG_STREAM
        )
        response = await client.send(request, stream=True)
        started.set()
        name = response.headers["x-ntonix-backend"]
        bodies[name] = b"".join([chunk async for chunk in response.aiter_raw()])

    async with trio.open_nursery() as nursery:
        for content in ("first", "second"):  # least-connections: one on each backend
            started = trio.Event()
            nursery.start_soon(stream, content, started)
            await started.wait()
        gateway.config.write(node(a))
        response = await gateway.post_reload()
        assert response.status_code == 200
        assert response.json() == {"reloaded": True, "problems": []}
        draining = (await gateway.backends())["b"]
        assert draining["draining"] is True
        assert draining["active_requests"] == 1
        assert await gateway.spread(4) == {"a": 4}  # no new request for b meanwhile

    for name in ("a", "b"):
        assert bodies[name].endswith(b"data: [DONE]\n\n"), name
        assert b"event: error" not in bodies[name]
    assert b.stats["completed"] == 1
    assert b.stats["client_disconnects"] == 0
    # Drained: gone from the status, and still no new traffic.
    await eventually(lambda: _is_gone(gateway, "b"))
    assert await gateway.spread(4) == {"a": 4}
    assert b.stats["requests"] == 1


async def _is_gone(gateway: ServedGateway, name: str) -> bool:
    return name not in await gateway.backends()


async def test_sighup_re_weights_the_backends(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn, client: httpx.AsyncClient
) -> None:
    a, b = await start_mock("a", tokens=1, ttft=0), await start_mock("b", tokens=1, ttft=0)
    config = ConfigFile(tmp_path / "ntonix.toml", strategy="weighted-round-robin")
    gateway = await serve_gateway(spawn, client, config, node(a), node(b))
    assert await gateway.spread(10) == {"a": 5, "b": 5}

    config.write(node(a, weight=3), node(b, weight=1))
    await gateway.sighup()
    backends = await gateway.backends()
    assert (backends["a"]["weight"], backends["b"]["weight"]) == (3, 1)
    spread = await gateway.spread(40)
    assert abs(spread["a"] - 30) <= 2
    assert spread.total() == 40


async def test_post_reload_needs_the_admin_token(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn, client: httpx.AsyncClient
) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    config = ConfigFile(tmp_path / "ntonix.toml", admin_token=ADMIN_TOKEN)
    gateway = await serve_gateway(spawn, client, config, node(a))
    config.write(node(a), node(b))
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": ADMIN_TOKEN}):
        refused = await client.post(f"{gateway.url}/ntonix/reload", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_admin_token"
    assert set(await gateway.backends()) == {"a"}

    accepted = await gateway.post_reload(ADMIN)
    assert accepted.status_code == 200
    assert accepted.json() == {"reloaded": True, "problems": []}
    assert set(await gateway.backends()) == {"a", "b"}


@attrs.frozen
class BadFile:
    name: str
    nodes: tuple[Node, ...]
    extra: str
    problem: str  # the key path its problem names


def bad_files(a: RunningMock) -> list[BadFile]:
    return [
        BadFile("negative weight", (Node("a", a.url, weight=-1),), "", "backends[0].weight"),
        BadFile("not a URL", (Node("a", "ftp://nowhere"),), "", "backends[0].url"),
        BadFile("unknown key", (node(a),), "[gateway]\nretires = 3\n", "gateway.retires"),
        BadFile("no backends", (), "", "backends"),
        BadFile("not TOML", (node(a),), "[[backends\n", "invalid TOML"),
    ]


@pytest.mark.parametrize("how", ["POST", "SIGHUP"])
async def test_an_invalid_config_is_refused_and_the_running_one_keeps_serving(
    how: str, tmp_path: Path, start_mock: StartMock, spawn: Spawn, client: httpx.AsyncClient
) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    config = ConfigFile(tmp_path / "ntonix.toml")
    gateway = await serve_gateway(spawn, client, config, node(a), node(b))
    before = await gateway.backends()
    for bad in bad_files(a):
        config.write(*bad.nodes, extra=bad.extra)
        if how == "POST":
            response = await gateway.post_reload()
            assert response.status_code == 400, bad.name
            assert response.json()["reloaded"] is False
            assert any(bad.problem in problem for problem in response.json()["problems"])
        else:
            logged = await gateway.sighup()
            assert REFUSED in logged, bad.name
            assert not re.search(RELOADED, logged), bad.name
            assert bad.problem.encode() in logged, bad.name
        assert (await gateway.backends()).keys() == before.keys(), bad.name
        assert await gateway.spread(4) == {"a": 2, "b": 2}, bad.name
    assert b"Traceback" not in gateway.process.output
    assert gateway.process.process.returncode is None


async def test_reload_adds_and_removes_backends_while_50_streams_are_in_flight(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn, client: httpx.AsyncClient
) -> None:
    a, b, c = [await start_mock(name) for name in "abc"]
    config = ConfigFile(tmp_path / "ntonix.toml")
    gateway = await serve_gateway(spawn, client, config, node(a), node(b))
    bodies: list[tuple[str, bytes]] = []
    started = 0

    async def stream(index: int) -> None:
        nonlocal started
        request = client.build_request(
            "POST", f"{gateway.url}{CHAT}", json=chat(f"s{index}"), headers=LONG_STREAM
        )
        response = await client.send(request, stream=True)
        assert response.status_code == 200
        started += 1
        body = b"".join([chunk async for chunk in response.aiter_raw()])
        bodies.append((response.headers["x-ntonix-backend"], body))

    async with trio.open_nursery() as nursery:
        for index in range(50):
            nursery.start_soon(stream, index)
        await wait_until(lambda: started == 50)
        assert a.stats["active"] + b.stats["active"] == 50
        config.write(node(a), node(c))  # b goes, c comes
        await gateway.sighup()
        after = Counter([await gateway.answered_by(f"after {i}") for i in range(4)])
        assert set(after) <= {"a", "c"}
        assert after["c"] > 0

    assert len(bodies) == 50
    for name, body in bodies:
        assert name in ("a", "b")
        assert body.endswith(b"data: [DONE]\n\n")
        assert all(not event.startswith(b"event: error") for event in sse_events(body))
    assert Counter(name for name, _ in bodies) == {"a": 25, "b": 25}
    assert a.stats["client_disconnects"] + b.stats["client_disconnects"] == 0


async def test_breaker_settings_of_a_reload_apply_to_the_backends_it_adds(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn, client: httpx.AsyncClient
) -> None:
    a = await start_mock("a")
    failing = await start_mock("failing", fail_rate=1.0)
    config = ConfigFile(tmp_path / "ntonix.toml", strategy="weighted-round-robin")
    gateway = await serve_gateway(spawn, client, config, node(a))
    config.write(node(a), node(failing), failure_threshold=1)
    await gateway.sighup()
    for index in range(4):
        await gateway.answered_by(f"q{index}")  # each 500 of `failing` is retried on a
    added = (await gateway.backends())["failing"]
    assert added["state"] == "open"
    assert failing.stats["requests"] == 1


async def test_a_reload_adds_a_named_key_and_its_token_window_keeps_counting(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn, client: httpx.AsyncClient
) -> None:
    a = await start_mock("a", tokens=100, token_delay=0.0)
    config = ConfigFile(tmp_path / "ntonix.toml")
    team = '[[auth.keys]]\nname = "team"\nkey = "sk-team"\ntokens_per_minute = 150\n'
    config.write(node(a), extra=team)
    gateway = await serve_gateway(spawn, client, config, node(a))
    config.write(node(a), extra=team)  # serve_gateway wrote the file without the key
    assert b"config reloaded" in await gateway.sighup()
    as_team = {"authorization": "Bearer sk-team"}
    first = await client.post(f"{gateway.url}{CHAT}", json=chat(stream=False), headers=as_team)
    assert first.status_code == 200
    newcomer = '[[auth.keys]]\nname = "new"\nkey = "sk-new"\n'
    config.write(node(a), extra=team + newcomer)
    assert (await gateway.post_reload()).status_code == 200
    as_new = {"authorization": "Bearer sk-new"}
    assert (await client.post(f"{gateway.url}{CHAT}", json=chat(), headers=as_new)).is_success
    # The key's window outlived the reload: its first answer still counts.
    again = await client.post(f"{gateway.url}{CHAT}", json=chat(stream=False), headers=as_team)
    assert again.status_code == 200 and int(again.headers["x-ratelimit-remaining-tokens"]) < 50
    third = await client.post(f"{gateway.url}{CHAT}", json=chat(stream=False), headers=as_team)
    assert third.status_code == 429
