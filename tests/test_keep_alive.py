"""The worker's keep-alive timeout and its shutdown of idle connections (`worker._TCPServer`),
over real sockets, Hypercorn's protocols and a small ASGI app.

A connection waiting for its next request is closed after `keep_alive_timeout`; one with a
request under way is not, however long the request takes; when the worker stops, an idle
connection closes at once and a busy one after its response. A connection that has ended is
freed at once, not left to the garbage collector.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import hypercorn.config
import trio
from hypercorn.utils import wrap_app

from ntonix.listening import ConnectionSlots
from ntonix.worker import serve_worker
from tests.support import wait_until

KEEP_ALIVE = 0.3
# A close due after KEEP_ALIVE arrives within this of it (a busy 2-core machine included).
CLOSE_MARGIN = 1.0
SLOW = 2 * KEEP_ALIVE  # how long a slow request takes: longer than the keep-alive timeout


class App:
    """Answers GET /fast at once, /slow after SLOW seconds and /held once `release` is set."""

    def __init__(self) -> None:
        self.holding = trio.Event()  # a /held request has arrived
        self.release = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/slow":
            await trio.sleep(SLOW)
        elif scope["path"] == "/held":
            self.holding.set()
            await self.release.wait()
        body = scope["path"].encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@attrs.frozen
class Served:
    port: int
    stop: trio.Event  # set: the worker stops
    slots: ConnectionSlots  # its open connections


@asynccontextmanager
async def worker(app: App, keep_alive: float) -> AsyncIterator[Served]:
    """`serve_worker` on a free port, until the block ends or `stop` is set."""
    settings = hypercorn.config.Config()
    settings.bind = ["127.0.0.1:0"]
    settings.keep_alive_timeout = keep_alive
    settings.graceful_timeout = 10
    settings.accesslog = None
    sockets = settings.create_sockets()
    for sock in sockets.insecure_sockets:
        sock.listen(16)
    port = sockets.insecure_sockets[0].getsockname()[1]
    served = Served(port, trio.Event(), ConnectionSlots(100))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_worker(
                wrap_app(app, settings.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                settings,
                sockets,
                served.slots,
                send_timeout=10.0,
                max_request_body=1024,
                shutdown_trigger=served.stop.wait,
                task_status=task_status,
            )
        )
        yield served
        served.stop.set()


class Client:
    """One HTTP/1.1 connection, by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = b""

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def ask(self, path: str) -> None:
        await self.stream.send_all(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())

    async def answer(self, path: str, timeout: float = 5.0) -> None:
        """Until the answer to `path` (its body is the path) has arrived."""
        with trio.fail_after(timeout):
            while not self.received.endswith(path.encode()):
                data = await self.stream.receive_some(65536)
                assert data, f"closed before the answer to {path}: {self.received!r}"
                self.received += data
        assert self.received.startswith(b"HTTP/1.1 200"), self.received

    async def closed_after(self, timeout: float = 5.0) -> float:
        """Seconds until the server closes the connection (nothing else may arrive)."""
        start = trio.current_time()
        with trio.fail_after(timeout):
            data = await self.stream.receive_some(65536)
        assert data == b"", data
        return trio.current_time() - start


async def test_an_idle_connection_closes_after_the_keep_alive_timeout_a_busy_one_does_not() -> None:
    async with worker(App(), KEEP_ALIVE) as served:
        port = served.port
        silent, slow = await Client.open(port), await Client.open(port)
        await slow.ask("/slow")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow.answer, "/slow")
            # A connection that never asks is idle from its start.
            waited = await silent.closed_after()
        assert KEEP_ALIVE * 0.9 <= waited <= KEEP_ALIVE + CLOSE_MARGIN
        # The slow request outlived the timeout and got its answer; the connection, idle from
        # then on, is closed a keep-alive timeout later, and not before.
        waited = await slow.closed_after()
        assert KEEP_ALIVE * 0.9 <= waited <= KEEP_ALIVE + CLOSE_MARGIN


async def test_a_head_trickled_in_is_dropped_at_the_keep_alive_timeout() -> None:
    # Bytes of an unfinished head do not restart the timer (slowloris: docs/security.md).
    async with worker(App(), KEEP_ALIVE) as served:
        port = served.port
        client = await Client.open(port)
        start = trio.current_time()
        await client.stream.send_all(b"GET /fast HTTP/1.1\r\n")

        async def trickle() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await trio.sleep(KEEP_ALIVE / 6)
                    await client.stream.send_all(b"x-slow: 1\r\n")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            # A line sent after the close may turn it into a reset: dropped all the same.
            with contextlib.suppress(trio.BrokenResourceError):
                await client.closed_after()
            nursery.cancel_scope.cancel()
        assert KEEP_ALIVE * 0.9 <= trio.current_time() - start <= KEEP_ALIVE + CLOSE_MARGIN


async def test_a_request_in_time_keeps_the_connection_for_another_timeout() -> None:
    async with worker(App(), KEEP_ALIVE) as served:
        port = served.port
        client = await Client.open(port)
        for _ in range(3):
            await trio.sleep(KEEP_ALIVE * 0.6)
            await client.ask("/fast")
            await client.answer("/fast")
            client.received = b""
        waited = await client.closed_after()
        assert KEEP_ALIVE * 0.9 <= waited <= KEEP_ALIVE + CLOSE_MARGIN


async def test_stopping_closes_idle_connections_at_once_and_busy_ones_after_their_answer() -> None:
    app = App()
    async with worker(app, keep_alive=60.0) as served:
        port = served.port
        idle, busy = await Client.open(port), await Client.open(port)
        await idle.ask("/fast")
        await idle.answer("/fast")
        await busy.ask("/held")
        await app.holding.wait()
        served.stop.set()
        assert await idle.closed_after(timeout=CLOSE_MARGIN) <= CLOSE_MARGIN
        app.release.set()
        await busy.answer("/held")
        await busy.closed_after(timeout=CLOSE_MARGIN)


async def test_an_ended_connection_leaves_no_reference_cycle() -> None:
    # Hypercorn's handler and protocols refer to each other through bound methods; left as
    # cycles, every connection's objects waited for the collector (docs/BENCHMARKS.md).
    async with worker(App(), KEEP_ALIVE) as served:
        port = served.port
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(5):
                client = await Client.open(port)
                await client.ask("/fast")
                await client.answer("/fast")
                await client.stream.aclose()
            await wait_until(lambda: served.slots.open == 0)  # every handler has ended
            gc.collect()
            left = {type(thing).__name__ for thing in gc.garbage}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert not left & {"_TCPServer", "GuardedProtocol", "GuardedH11Protocol", "InboxTaskGroup"}
