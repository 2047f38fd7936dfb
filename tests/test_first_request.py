"""A connection's requests under `ntonix serve` (`worker._TCPServer`), over real sockets.

A request that came with its connection reaches the app in the scheduler pass after the
connection's handler starts, and one that comes later two passes after its bytes arrive:
Hypercorn's own order (start the keep-alive timer, read, stop the timer at the request, each
behind a lock) took six and three. The keep-alive timer still guards every connection that is
not serving a request: one silent from its start, one that sent half a head, one kept alive
after its response.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from ntonix.config import Config
from ntonix.hangups import HangupWatch
from ntonix.protocols import Guard
from ntonix.server import hypercorn_config
from ntonix.worker import IdleConnections, _TCPServer

REQUEST = b"GET /first HTTP/1.1\r\nhost: test\r\n\r\n"
# Short, so that the tests of the timer wait little; the tests without it end well before.
KEEP_ALIVE = 0.3
CLOSED_WITHIN = 5.0


class _Passes(trio.abc.Instrument):
    """Counts the scheduler's passes: one per I/O wait, each running the tasks then ready."""

    def __init__(self) -> None:
        self.count = 0

    def after_io_wait(self, timeout: float) -> None:
        self.count += 1


class _App:
    """Answers every request with 200 "ok", noting the pass in which each one reached it."""

    def __init__(self, passes: _Passes) -> None:
        self.passes = passes
        self.reached: list[int] = []
        self.arrived = trio.Event()

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self.reached.append(self.passes.count)
        self.arrived.set()
        await receive()
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def _connection(
    nursery: trio.Nursery, app: _App, passes: _Passes, first: bytes = b""
) -> AsyncIterator[tuple[socket.socket, list[int]]]:
    """A client socket (blocking, with a timeout) connected to a `_TCPServer` handler, which
    starts once `first` has arrived in the server's socket; yields it and the pass in which
    the handler began."""
    settings = hypercorn_config(Config(backends=()), ["127.0.0.1:0"])
    settings.keep_alive_timeout = KEEP_ALIVE
    hangups = HangupWatch()
    with socket.create_server(("127.0.0.1", 0)) as listening:
        client = socket.create_connection(listening.getsockname())
        client.settimeout(CLOSED_WITHIN)
        accepted, _ = listening.accept()
        client.sendall(first)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(accepted))
        if first:
            await trio.lowlevel.wait_readable(stream.socket)  # it came with the connection
        server = _TCPServer(
            Guard(send_timeout=30.0, max_request_body=1 << 20),
            hangups,
            IdleConnections(),
            ASGIWrapper(app),  # type: ignore[arg-type]  # Hypercorn's types want a Framework
            settings,
            WorkerContext(max_requests=None),
            ConnectionState({}),
            stream,  # type: ignore[arg-type]  # Hypercorn's own type says TLS; either works
        )
        began: list[int] = []

        async def handle() -> None:
            began.append(passes.count)
            await server.run()

        nursery.start_soon(handle)
        try:
            yield client, began
        finally:
            client.close()
            hangups.close()


async def _answer(client: socket.socket) -> bytes:
    """One whole answer of `_App` (read in a thread)."""

    def read() -> bytes:
        received = b""
        while not received.endswith(b"\r\n\r\nok"):
            data = client.recv(65536)
            if not data:
                raise EOFError(f"closed after {received!r}")
            received += data
        return received

    return await trio.to_thread.run_sync(read)


async def _read_until_closed(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (read in a thread)."""

    def read() -> bytes:
        received = b""
        while data := client.recv(65536):
            received += data
        return received

    return await trio.to_thread.run_sync(read)


@pytest.fixture
async def passes() -> AsyncIterator[_Passes]:
    counter = _Passes()
    trio.lowlevel.add_instrument(counter)
    yield counter
    trio.lowlevel.remove_instrument(counter)


async def test_a_request_that_came_with_its_connection_reaches_the_app_in_the_next_pass(
    passes: _Passes, nursery: trio.Nursery
) -> None:
    app = _App(passes)
    async with _connection(nursery, app, passes, REQUEST) as (client, began):
        with trio.fail_after(CLOSED_WITHIN):
            await app.arrived.wait()
        # The handler's first step reads the request and starts the app's task, which runs in
        # the next pass (Hypercorn's order took six: lock, task start, its start, read, lock).
        assert app.reached[0] - began[0] == 1
        assert (await _answer(client)).startswith(b"HTTP/1.1 200")


async def test_a_request_that_comes_later_reaches_the_app_in_the_pass_after_its_bytes(
    passes: _Passes, nursery: trio.Nursery
) -> None:
    app = _App(passes)
    async with _connection(nursery, app, passes) as (client, _):
        await trio.testing.wait_all_tasks_blocked()  # the handler waits, its timer runs
        client.sendall(REQUEST)  # a few bytes on loopback: in the server's socket at once
        sent = passes.count
        with trio.fail_after(CLOSED_WITHIN):
            await app.arrived.wait()
        # The next pass wakes the reader, which stops the timer and starts the app's task: it
        # runs in the pass after (Hypercorn's lock at the request took one more).
        assert app.reached[0] - sent == 2
        assert (await _answer(client)).startswith(b"HTTP/1.1 200")


async def test_after_its_response_a_kept_alive_connection_is_closed_by_the_timer(
    passes: _Passes, nursery: trio.Nursery
) -> None:
    app = _App(passes)
    async with _connection(nursery, app, passes, REQUEST) as (client, _):
        start = trio.current_time()
        received = await _read_until_closed(client)
        assert received.count(b"HTTP/1.1 200") == 1
        # Closed by the keep-alive timer, which started when the response ended.
        assert KEEP_ALIVE <= trio.current_time() - start < CLOSED_WITHIN


@pytest.mark.parametrize("first", [b"", b"GET /first HTTP/1.1\r\nhost: te"], ids=["silent", "half"])
async def test_a_connection_that_has_not_begun_a_request_is_closed_by_the_timer(
    first: bytes, passes: _Passes, nursery: trio.Nursery
) -> None:
    app = _App(passes)
    async with _connection(nursery, app, passes, first) as (client, _):
        start = trio.current_time()
        assert await _read_until_closed(client) == b""
        assert KEEP_ALIVE <= trio.current_time() - start < CLOSED_WITHIN
        assert app.reached == []


async def test_a_second_request_on_the_connection_stops_the_timer_until_its_answer(
    passes: _Passes, nursery: trio.Nursery
) -> None:
    app = _App(passes)
    async with _connection(nursery, app, passes, REQUEST) as (client, _):
        await _answer(client)
        await trio.sleep(KEEP_ALIVE / 2)  # the timer runs: the connection is idle
        await trio.to_thread.run_sync(client.sendall, REQUEST)
        await _answer(client)
        start = trio.current_time()
        assert await _read_until_closed(client) == b""
        # The timer started again after the second answer, not at the connection's start.
        assert trio.current_time() - start >= KEEP_ALIVE * 0.9
        assert len(app.reached) == 2
