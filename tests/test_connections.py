"""The front door's connection cap (`gateway.max_connections`) and the send timeout of the plain
hypercorn command, over real sockets and real processes.

A connection past the cap is accepted and reset at once; the client never waits in the backlog.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing
import trustme

from ntonix.listening import (
    REFUSAL_WARNING_INTERVAL,
    CappedListener,
    ConnectionSlots,
    set_send_timeout_on_listening_sockets,
)
from ntonix.server import serve
from tests.conftest import RunningMock, StartMock
from tests.support import (
    PYTHON,
    Spawn,
    backend,
    chat,
    gateway_config,
    serve_two_workers,
    serving,
)

# A refused client must know within this (it takes about a millisecond); a hang would last
# until the test's end.
REFUSED_WITHIN = 1.0
# A closed connection's slot is free again within this: well under Hypercorn's keep-alive
# timeout (5 s), after which even a handler that missed the close would end.
SLOT_FREED_WITHIN = 2.0
# Long enough for the gateway to have finished a response and gone idle on the connection.
SETTLE = 0.1


class Connection:
    """One client connection, plain or TLS, speaking HTTP/1.1 by hand."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.received = b""

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> Connection:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
            await stream.do_handshake()
        return cls(stream)

    async def send(self, method: str, path: str, payload: object | None = None) -> None:
        body = json.dumps(payload).encode() if payload is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {len(body)}\r\n"
        if payload is not None:
            head += "content-type: application/json\r\n"
        await self.stream.send_all(head.encode() + b"\r\n" + body)

    async def read_until(self, marker: bytes, timeout: float = 5) -> None:
        """Until `marker` arrives after what was read so far."""
        start = len(self.received)
        with trio.fail_after(timeout):
            while marker not in self.received[start:]:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"closed before {marker!r}; got {self.received!r}")
                self.received += data

    async def health(self) -> None:
        """GET /ntonix/health, answered 200 on this connection (which stays open)."""
        await self.send("GET", "/ntonix/health")
        await self.read_until(b'"ok"}')
        assert b"HTTP/1.1 200" in self.received

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def refusal(port: int, tls: ssl.SSLContext | None = None) -> str:
    """Connect and ask; returns what the client saw, "reset" or "eof", within REFUSED_WITHIN."""
    with trio.fail_after(REFUSED_WITHIN), trio.socket.socket() as sock:
        try:
            # On loopback the reset can arrive before connect() has even returned.
            await sock.connect(("127.0.0.1", port))
            stream: trio.abc.Stream = trio.SocketStream(sock)
            if tls is not None:  # the refusal comes before the handshake could finish
                stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
            await stream.send_all(b"GET /ntonix/health HTTP/1.1\r\nhost: test\r\n\r\n")
            data = await stream.receive_some(65536)
        except ConnectionResetError:
            return "reset"
        except trio.BrokenResourceError as error:
            # A reset as the socket sees it, or as OpenSSL does in the middle of a handshake.
            assert isinstance(error.__cause__, ConnectionResetError | ssl.SSLError), error
            return "reset"
    assert data == b"", data
    return "eof"


async def served_again(port: int, tls: ssl.SSLContext | None = None) -> Connection:
    """A new connection that gets served, once a slot has freed (refused attempts meanwhile)."""
    with trio.fail_after(SLOT_FREED_WITHIN):
        while True:
            with suppress(OSError, trio.BrokenResourceError, EOFError):
                connection = await Connection.open(port, tls)
                try:
                    await connection.health()
                except BaseException:
                    await connection.aclose()
                    raise
                return connection
            await trio.sleep(0.01)


# --- How a held connection occupies its slot -------------------------------------------------


async def _nothing(connection: Connection) -> None:
    pass


async def _stream(connection: Connection) -> None:
    await connection.send("POST", "/v1/chat/completions", chat())
    await connection.read_until(b"data: ")


async def _more_stream(connection: Connection) -> None:
    await connection.read_until(b"data: ")


@attrs.frozen
class Hold:
    """How a test occupies a slot, and how it checks afterwards that the connection was (and
    still is) served rather than refused."""

    name: str
    begin: Callable[[Connection], Awaitable[None]]
    still_served: Callable[[Connection], Awaitable[None]]


IDLE = Hold("idle_keep_alive", Connection.health, Connection.health)
SILENT = Hold("silent_before_its_first_request", _nothing, Connection.health)
STREAMING = Hold("streaming", _stream, _more_stream)
HOLDS = [IDLE, SILENT, STREAMING]


@asynccontextmanager
async def held(
    count: int, port: int, hold: Hold, tls: ssl.SSLContext | None = None
) -> AsyncIterator[list[Connection]]:
    connections: list[Connection] = []
    try:
        for _ in range(count):
            connections.append(await Connection.open(port, tls))
            await hold.begin(connections[-1])
        yield connections
    finally:
        for connection in connections:
            await connection.aclose()


async def _start_gateway(
    nursery: trio.Nursery, mock: RunningMock, max_connections: int, **tls: str
) -> int:
    config = gateway_config(backend(mock.url, "m"), max_connections=max_connections)
    run = partial(serve, config, ["127.0.0.1:0"], shutdown_trigger=trio.sleep_forever, **tls)
    urls: list[str] = await nursery.start(run)
    port = httpx.URL(urls[0]).port
    assert port is not None
    return port


@pytest.mark.parametrize("hold", HOLDS, ids=[hold.name for hold in HOLDS])
async def test_past_max_connections_a_connection_is_reset_at_once_until_a_slot_frees(
    hold: Hold, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    mock = await start_mock(tokens=2000, token_delay=0.005)
    port = await _start_gateway(nursery, mock, max_connections=3)
    async with held(3, port, hold) as connections:
        for _ in range(3):  # and again: a refusal takes no slot
            assert await refusal(port) == "reset"
        for connection in connections:
            await hold.still_served(connection)

        await trio.sleep(SETTLE)
        await connections.pop().aclose()
        replacement = await served_again(port)
        assert await refusal(port) == "reset"  # full again
        await replacement.aclose()
        for connection in connections:
            await hold.still_served(connection)


@pytest.fixture
def certs(tmp_path: Path) -> tuple[trustme.CA, dict[str, str]]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "server.pem", tmp_path / "server.key"
    certfile.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(keyfile)
    return ca, {"certfile": str(certfile), "keyfile": str(keyfile)}


async def test_the_cap_holds_over_tls_and_refuses_before_the_handshake(
    certs: tuple[trustme.CA, dict[str, str]], start_mock: StartMock, nursery: trio.Nursery
) -> None:
    ca, files = certs
    client = ssl.create_default_context()
    ca.configure_trust(client)
    port = await _start_gateway(nursery, await start_mock(), max_connections=2, **files)
    async with held(2, port, IDLE, client) as connections:
        assert await refusal(port, client) == "reset"
        await trio.sleep(SETTLE)
        await connections.pop().aclose()
        replacement = await served_again(port, client)
        await connections[0].health()
        await replacement.aclose()


def test_refusals_are_logged_at_most_once_per_interval_with_their_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    slots = ConnectionSlots(1, clock=lambda: now[0])
    assert slots.take()
    with caplog.at_level(logging.WARNING, logger="ntonix.listening"):
        for moment in [100.0, 101.0, 100.0 + REFUSAL_WARNING_INTERVAL - 0.5]:
            now[0] = moment
            assert not slots.take()
        now[0] = 100.0 + REFUSAL_WARNING_INTERVAL
        assert not slots.take()
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "max_connections reached (1 open): refused 1 new connection(s), 1 in all",
        "max_connections reached (1 open): refused 3 new connection(s), 4 in all",
    ]
    slots.free()
    assert slots.take()  # the freed slot is taken again


async def test_pending_connections_are_accepted_without_waiting_for_readiness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With N workers on one socket, every wait for readiness is woken by every connection: a
    # burst's connections must be taken from the backlog as long as some are pending.
    waits: list[object] = []
    wait_readable = trio.lowlevel.wait_readable

    async def counted(sock: socket.socket) -> None:
        waits.append(sock)
        await wait_readable(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counted)
    with socket.create_server(("127.0.0.1", 0)) as sock:
        listener = CappedListener(sock, ConnectionSlots(10))
        # Connected by the kernel (in the backlog) before anything is accepted.
        clients = [socket.create_connection(sock.getsockname()) for _ in range(3)]
        streams = [await listener.accept() for _ in clients]
        assert waits == []

        async def accept_one() -> None:
            streams.append(await listener.accept())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_one)
            await trio.testing.wait_all_tasks_blocked()
            assert waits == [sock]  # nothing pending: now it waits
            late = socket.create_connection(sock.getsockname())
        assert len(streams) == 4
        for stream in streams:
            await stream.aclose()
        for client in [*clients, late]:
            client.close()


def test_workers_sharing_their_counts_are_capped_together() -> None:
    counts = [0, 0]  # in shared memory between worker processes; a list will do here
    first, second = (ConnectionSlots(3, counts=counts, index=index) for index in (0, 1))
    assert [first.take(), first.take(), second.take()] == [True, True, True]
    assert not first.take() and not second.take()
    assert counts == [2, 1] and first.open == second.open == 3
    first.free()
    assert second.take()  # the slot one worker frees is the other's to take
    assert counts == [1, 2]


# --- `ntonix serve --workers 2`: one cap for all workers, and their supervisor --------------


def _config_file(tmp_path: Path, mock: RunningMock, **gateway: float) -> Path:
    lines = ["[gateway]", *(f"{key} = {value}" for key, value in gateway.items())]
    lines += ["[cache]", "enabled = false", "[[backends]]", 'name = "m"', f'url = "{mock.url}"']
    path = tmp_path / "ntonix.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_with_two_workers_max_connections_is_the_total_of_both(
    tmp_path: Path, start_mock: StartMock, spawn_job: Spawn
) -> None:
    mock = await start_mock()
    gateway, port = await serve_two_workers(
        spawn_job, _config_file(tmp_path, mock, max_connections=3)
    )
    assert b"2 workers: 3 client connections at most in all" in gateway.output
    async with held(3, port, IDLE) as connections:
        for _ in range(4):  # whichever worker accepts it
            assert await refusal(port) == "reset"
        await trio.sleep(SETTLE)
        await connections.pop().aclose()
        await (await served_again(port)).aclose()
        for connection in connections:
            await connection.health()
    await gateway.wait_for(rb"max_connections reached \(3 open\): refused 1 new connection")
    assert await gateway.stop(signal.SIGTERM) == 0
    assert b"Traceback" not in gateway.output


STOPS: dict[str, Callable[[int], None]] = {
    "ctrl_c": lambda pid: os.killpg(pid, signal.SIGINT),  # a terminal signals the whole group
    "sigterm": lambda pid: os.kill(pid, signal.SIGTERM),  # kill, docker stop: the parent only
    "sigterm_to_the_group": lambda pid: os.killpg(pid, signal.SIGTERM),  # systemd's default
}


@pytest.mark.parametrize("stop", STOPS.values(), ids=STOPS.keys())
async def test_with_two_workers_a_stop_signal_lets_streams_finish_then_exits_0(
    stop: Callable[[int], None], tmp_path: Path, start_mock: StartMock, spawn_job: Spawn
) -> None:
    mock = await start_mock(tokens=20, token_delay=0.1)
    gateway, port = await serve_two_workers(
        spawn_job, _config_file(tmp_path, mock, graceful_timeout=30)
    )
    async with held(2, port, STREAMING) as streams:
        stop(gateway.pid)
        for stream in streams:
            await stream.read_until(b"data: [DONE]", timeout=10)
    with trio.fail_after(15):
        assert await gateway.process.wait() == 0
    assert mock.stats["completed"] == 2
    assert b"Traceback" not in gateway.output
    with pytest.raises(OSError):  # no worker left listening
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_with_two_workers_sighup_reloads_each_worker_and_stops_none(
    tmp_path: Path, start_mock: StartMock, spawn_job: Spawn
) -> None:
    mock = await start_mock()
    gateway, port = await serve_two_workers(spawn_job, _config_file(tmp_path, mock))
    gateway.process.send_signal(signal.SIGHUP)
    with trio.fail_after(10):
        while gateway.output.count(b"config reloaded") < 2:
            await trio.sleep(0.01)
    connection = await Connection.open(port)
    await connection.health()
    await connection.aclose()
    assert await gateway.stop(signal.SIGTERM) == 0


# --- The plain hypercorn command: the send timeout on the sockets Hypercorn binds ------------


def test_the_send_timeout_is_set_on_listening_tcp_sockets_only(tmp_path: Path) -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as v4,
        socket.create_server(("::1", 0), family=socket.AF_INET6) as v6,
        socket.socket(socket.AF_UNIX) as unix,
        socket.create_connection(v4.getsockname()) as client,
    ):
        unix.bind(str(tmp_path / "s"))
        unix.listen()
        assert set_send_timeout_on_listening_sockets(1.5) >= 2
        for listener in (v4, v6):
            assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 1500
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        # The originals stay open and listening: only duplicates were closed.
        with socket.create_connection(v6.getsockname()[:2]), socket.socket(socket.AF_UNIX) as c:
            c.connect(str(tmp_path / "s"))


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_plain_hypercorn_command_sets_the_send_timeout_on_its_listening_socket(
    workers: int, tmp_path: Path, start_mock: StartMock, spawn_job: Spawn
) -> None:
    # The socket is ours, handed to Hypercorn as fd://N: both refer to the same socket, so the
    # option its worker sets shows here.
    mock = await start_mock()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        command = [PYTHON, "-m", "hypercorn", "--worker-class", "trio", "--workers", str(workers)]
        gateway = await spawn_job(
            *[*command, "--bind", f"fd://{listener.fileno()}", "ntonix:app"],
            env={"NTONIX_CONFIG": str(_config_file(tmp_path, mock))},
            pass_fds=[listener.fileno()],
        )
        await serving(gateway, workers)
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
        assert await gateway.stop(signal.SIGTERM) == 0
