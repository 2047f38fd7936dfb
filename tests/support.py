"""Helpers for tests that talk to real servers over real sockets."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from mocks.answers import is_generation
from mocks.llm import MockLLM, MockOptions
from mocks.playback import Connection, Outcome
from mocks.replies import Request
from ntonix.config import (
    BackendSettings,
    BalancerSettings,
    CacheSettings,
    Config,
    GatewaySettings,
    HealthSettings,
)
from ntonix.core.telemetry import RequestRecord


def chat(content: str = "Hello", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A deterministic chat completion request (temperature 0) unless told otherwise."""
    return {
        "model": "mock-llm",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        "temperature": 0,
        **extra,
    }


def sse_events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll until predicate() holds; return how long it took. Fails the test on timeout."""
    start = time.monotonic()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.002)
    return time.monotonic() - start


async def status(client: httpx.AsyncClient, gateway: str) -> dict[str, Any]:
    response = await client.get(f"{gateway}/ntonix/status")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def pool_totals(snapshot: dict[str, Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for backend in snapshot["backends"]:
        for key, value in backend["pool"].items():
            totals[key] = totals.get(key, 0) + value
    return totals


class RawClient:
    """An HTTP/1.1 client on a bare socket, for tests that must hang up at an exact moment."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = b""

    @classmethod
    async def connect(cls, base_url: str) -> RawClient:
        url = httpx.URL(base_url)
        return cls(await trio.open_tcp_stream(url.host, url.port or 80))

    async def send_request(
        self,
        method: str,
        path: str,
        payload: object | None = None,
        *,
        headers: dict[str, str] | None = None,
        body_bytes_to_send: int | None = None,
    ) -> None:
        body = json.dumps(payload).encode() if payload is not None else b""
        lines = [f"{method} {path} HTTP/1.1", "host: test", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if payload is not None:
            lines.append("content-type: application/json")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        sent = body if body_bytes_to_send is None else body[:body_bytes_to_send]
        await self.stream.send_all(head + sent)

    async def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        with trio.fail_after(timeout):
            while marker not in self.received:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"closed before {marker!r}; got {self.received!r}")
                self.received += data
        return self.received

    async def hang_up(self) -> float:
        """Close the connection; returns the wall-clock time of the close."""
        self.stream.socket.close()
        return time.time()


# --- Balancing, health and reload tests ---------------------------------------------------


# Probes fast enough that health tests take a second, not a minute.
FAST_HEALTH = HealthSettings(
    interval=0.2, timeout=0.5, failure_threshold=3, open_for=0.5, max_open_for=2
)
# Probes that run once at start-up and then stay out of the way, so that only the requests a
# test sends feed the breakers; circuits stay open long enough to look at them.
QUIET_HEALTH = HealthSettings(
    interval=60, timeout=2, failure_threshold=3, open_for=60, max_open_for=120
)
REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


async def backend_status(
    client: httpx.AsyncClient, gateway: str, name: str, *, headers: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """One backend's record in /ntonix/status, or None when the gateway no longer lists it."""
    response = await client.get(f"{gateway}/ntonix/status", headers=headers)
    assert response.status_code == 200, response.text
    for backend in response.json()["backends"]:
        if backend["name"] == name:
            return dict(backend)
    return None


async def wait_for_backend(
    client: httpx.AsyncClient,
    gateway: str,
    name: str,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Poll /ntonix/status until `name`'s record satisfies predicate; return that record."""
    with trio.fail_after(timeout):
        while True:
            record = await backend_status(client, gateway, name, headers=headers)
            if record is not None and predicate(record):
                return record
            await trio.sleep(0.01)


async def queued(client: httpx.AsyncClient, gateway: str) -> int:
    """Requests waiting for a free slot, as /ntonix/status counts them."""
    count: int = (await status(client, gateway))["queued"]
    return count


async def wait_for_queued(
    client: httpx.AsyncClient, gateway: str, count: int, timeout: float = 5.0
) -> None:
    with trio.fail_after(timeout):
        while await queued(client, gateway) != count:
            await trio.sleep(0.005)


class _WithExtraHeaders:
    """A mock connection whose response heads carry extra headers."""

    def __init__(self, connection: Connection, extra: tuple[tuple[str, str], ...]) -> None:
        self._connection = connection
        self._extra = extra

    def start(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        self._connection.start(status, (*headers, *self._extra))

    async def write(self, data: bytes, *, last: bool) -> bool:
        return await self._connection.write(data, last=last)

    async def wait_disconnect(self) -> None:
        await self._connection.wait_disconnect()


class SteerableMock(MockLLM):
    """A mock backend that a test can make misbehave on its own, unlike its peers.

    `x-mock-*` request headers reach whichever backend the gateway picks; `forced_headers` act
    as if every generation request to this backend carried them (say x-mock-status: 429), and
    `response_headers` are added to its answers (say Retry-After). Probes are left alone.
    """

    def __init__(self, options: MockOptions | None = None) -> None:
        super().__init__(options)
        self.forced_headers: dict[str, str] = {}
        self.response_headers: tuple[tuple[str, str], ...] = ()

    async def respond(self, request: Request, connection: Connection) -> Outcome:
        if is_generation(request):
            if self.forced_headers:
                request = attrs.evolve(request, headers={**request.headers, **self.forced_headers})
            if self.response_headers:
                connection = _WithExtraHeaders(connection, self.response_headers)
        return await super().respond(request, connection)


class ChildProcess:
    """A child process (a gateway or a mock) whose stdout and stderr are collected."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    async def collect(self) -> None:
        assert self.process.stdout is not None
        while data := await self.process.stdout.receive_some(65536):
            self.output += data

    async def wait_for(self, pattern: bytes, timeout: float = 20) -> re.Match[bytes]:
        """The first match of `pattern` in the output so far or to come."""
        with trio.fail_after(timeout):
            while not (match := re.search(pattern, self.output)):
                if self.process.returncode is not None:
                    await trio.sleep(0.1)  # the last of the output
                    if match := re.search(pattern, self.output):
                        return match
                    raise AssertionError(
                        f"exited {self.process.returncode} before {pattern!r}:\n"
                        + self.output.decode(errors="replace")
                    )
                await trio.sleep(0.01)
        return match

    async def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would end it, and reap it."""
        self.process.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await self.process.wait()

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send `sig` and wait for the exit; SIGKILL if it is not gone after `timeout`."""
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.move_on_after(timeout):
            return await self.process.wait()
        await self.kill()
        return await self.process.wait()


Spawn = Callable[..., Awaitable[ChildProcess]]
MOCK_LISTENING = rb"mock \S+ listening on (http://127\.0\.0\.1:(\d+))"


@attrs.frozen
class MockProcess:
    """`python -m mocks.llm` running as a child process."""

    child: ChildProcess
    url: str
    port: int

    async def stats(self, client: httpx.AsyncClient) -> dict[str, Any]:
        response = await client.get(f"{self.url}/mock/stats")
        assert response.status_code == 200
        result: dict[str, Any] = response.json()
        return result


SERVE = (PYTHON, "-m", "ntonix.cli", "serve", "--bind", "127.0.0.1:0")
RUNNING_ON = rb"Running on (http://127\.0\.0\.1:\d+)"
RUNNING_ON_PORT = rb"Running on (https?://127\.0\.0\.1:(\d+))"  # plain or TLS; the port


async def spawn_serve(spawn: Spawn, tmp_path: Path, backend_url: str) -> tuple[ChildProcess, str]:
    """`ntonix serve` in its own process, with one backend and every other key at its default
    (the access log on stderr, graceful_timeout 30 s); the child and the gateway's URL."""
    config = tmp_path / "ntonix.toml"
    config.write_text(f'[[backends]]\nname = "m"\nurl = "{backend_url}"\n')
    gateway = await spawn(*SERVE, "--config", str(config))
    return gateway, (await gateway.wait_for(RUNNING_ON)).group(1).decode()


async def serving(child: ChildProcess, workers: int) -> int:
    """Until every worker of `ntonix serve` has logged its `Running on` line; returns the
    port."""
    await child.wait_for(RUNNING_ON_PORT)  # fails with the output if the process exits first
    with trio.fail_after(30):
        while len(found := re.findall(RUNNING_ON_PORT, child.output)) < workers:
            await trio.sleep(0.01)
    return int(found[0][1])


async def serve_two_workers(spawn: Spawn, config: Path) -> tuple[ChildProcess, int]:
    """`ntonix serve --workers 2` with the config file `config`; the parent and the port."""
    gateway = await spawn(*SERVE, "--config", str(config), "--workers", "2")
    return gateway, await serving(gateway, 2)


def workers_of(parent: int) -> list[int]:
    """The worker processes of `ntonix serve` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [pid for pid in map(int, children) if b"spawn_main" in _command_line(pid)]


def _command_line(pid: int) -> bytes:
    """Empty for a process that has gone since its parent listed it (a worker that died)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


async def spawn_mock(spawn: Spawn, name: str, *options: str, port: int = 0) -> MockProcess:
    """A lean mock backend in its own process (so that it can be killed); port 0 picks one."""
    child = await spawn(
        PYTHON, "-m", "mocks.llm", "--lean", "--name", name, "--port", str(port), *options
    )
    match = await child.wait_for(MOCK_LISTENING)
    return MockProcess(child, match.group(1).decode(), int(match.group(2)))


def backend(url: str, name: str, **settings: Any) -> BackendSettings:
    """One [[backends]] entry, named for x-ntonix-backend and /ntonix/status."""
    return BackendSettings(name=name, url=url, **settings)


def gateway_config(
    *backends: BackendSettings,
    strategy: str = "least-connections",
    health: HealthSettings = QUIET_HEALTH,
    **gateway: Any,
) -> Config:
    """A whole config: backends, [balancer] strategy, [health] and [gateway] keys.

    The response cache is off: a routing test needs every request to reach a backend, and
    identical requests in flight must not be coalesced into one.
    """
    return Config(
        backends=backends,
        gateway=GatewaySettings(**gateway),
        balancer=BalancerSettings(strategy=strategy),
        health=health,
        cache=CacheSettings(enabled=False),
    )


def closed_port_url() -> str:
    """A URL where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> float:
    """Like wait_until, for a check that must await (say, a request); returns the time taken."""
    start = time.monotonic()
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.01)
    return time.monotonic() - start


async def answers_200(client: httpx.AsyncClient, url: str) -> bool:
    """Whether a GET of `url` is 200 now: for `eventually`, say until /ntonix/ready is."""
    return (await client.get(url)).status_code == 200


def chat_record() -> RequestRecord:
    """The record of a chat completion from 10.0.0.7, for tests that drive a `Downstream`."""
    return RequestRecord(
        started=0.0,
        wall_time=0.0,
        request_id=b"r",
        client="10.0.0.7",
        method="POST",
        path="/v1/chat/completions",
        cache="",
    )
