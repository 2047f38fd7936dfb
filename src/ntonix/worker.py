"""One serving worker: Hypercorn's HTTP machinery behind our own listeners.

Hypercorn's `worker_serve` builds its listeners itself and has no connection cap (and ASGI
never sees connections), so this runs its parts ourselves: the lifespan, Hypercorn's TCPServer
for each connection (speaking HTTP/2 through `protocols.GuardedH2Protocol`), and a
`CappedListener` in front of every socket. The lifespan outlives the listeners: it starts
before the first accept and shuts down after the drain.
"""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import hypercorn.config
import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr, repr_socket_addr

from ntonix.hangups import HangupWatch
from ntonix.inbox import InboxTaskGroup
from ntonix.listening import CappedListener, ConnectionSlots
from ntonix.plain_socket import read_now, write_now
from ntonix.protocols import Guard, GuardedH11Protocol, GuardedProtocol

log = logging.getLogger("ntonix.server")  # the `Running on` lines' logger, as it always was

Listener = trio.SSLListener[trio.SocketStream] | CappedListener


async def serve_worker(
    app: AppWrapper,
    settings: hypercorn.config.Config,
    sockets: hypercorn.config.Sockets,
    slots: ConnectionSlots,
    *,
    send_timeout: float,
    max_request_body: int,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `sockets` (listening already) until `shutdown_trigger` returns, then stop accepting
    and let open connections finish for up to `settings.graceful_timeout`.

    A connection is accepted only when `slots` has room; an HTTP/2 stream whose client leaves
    its window shut for `send_timeout` is reset; a chunk over `max_request_body` gets 413.
    Reports the URLs it serves through
    `task_status`. Closes the sockets.
    """
    all_sockets = [*sockets.secure_sockets, *sockets.insecure_sockets]
    hangups = HangupWatch()
    trio.lowlevel.add_instrument(hangups)
    try:
        state: LifespanState = {}
        lifespan = Lifespan(app, settings, state)
        context = WorkerContext(max_requests=None)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            tune_garbage_collector()
            listeners, urls = _listeners(settings, sockets, slots)
            guard = Guard(send_timeout=send_timeout, max_request_body=max_request_body)
            tcp_server = partial(
                _TCPServer, guard, hangups, app, settings, context, ConnectionState(state.copy())
            )
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners,
                            slots.holding(tcp_server),
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    for url in urls:
                        log.info("Running on %s (CTRL + C to quit)", url)
                    task_status.started(urls)
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()  # closes the listeners
                # Hypercorn closes idle keep-alive connections, and each busy one after its
                # current request, once the worker is terminated.
                await context.terminated.set()
                connections.cancel_scope.deadline = trio.current_time() + settings.graceful_timeout
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(hangups)
        hangups.close()
        for sock in all_sockets:
            sock.close()


# Allocations between young collections (CPython's default is 700). Trio makes cyclic garbage
# (cancelled tasks' exceptions and frames) with every request; collecting it ten times less
# often costs less in all, for a few thousand short-lived objects more held at a time.
YOUNG_COLLECTION_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """Once the worker has started: what exists now (modules, config, pools) lives as long as
    the process, so it leaves the collector's view (`gc.freeze`) and no full collection scans
    it again; young collections run every `YOUNG_COLLECTION_THRESHOLD` allocations."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


class _TCPServer(TCPServer):
    """Hypercorn's handler of one connection, with HTTP/2 guarded (`protocols`), its socket in
    the worker's hang-up watch (`hangups`), ending as soon as the client has closed it, and
    writing to a plain socket without waiting when it can.

    A request starts at once. Hypercorn starts the keep-alive timer first (a lock and a task
    start: four schedule points, each a pass of the loop behind every other connection's ready
    work), reads after a fifth, then stops the timer at the request (a lock: a sixth). Here the
    bytes a plain socket already holds are handed to the protocol first, the timer starts only
    when no request is under way, and it is a cancel scope set and cancelled without waiting
    (`_KeepAliveTimer`). A burst's requests reach the app two passes after their accept
    instead of seven; one that comes later, two passes after its bytes instead of three.

    Hypercorn 0.18 sees the end of a kept-alive connection that is idle (between requests) but
    then waits for its keep-alive timer (5 s) before the handler ends: the socket, and its slot
    of max_connections, would stay taken that long after every such close.
    """

    def __init__(
        self,
        guard: Guard,
        hangups: HangupWatch,
        app: AppWrapper,
        config: hypercorn.config.Config,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SSLStream[trio.SocketStream],
    ) -> None:
        super().__init__(app, config, context, state, stream)
        self.guard = guard
        self.hangups = hangups
        self._join_next = False  # see `join_next_write`
        self._held = b""  # written with the next write
        self._busy = False  # a request is under way (Hypercorn's `Updated` events)
        self._timer = _KeepAliveTimer()  # in place of Hypercorn's `idle_task`

    async def run(self) -> None:
        # Hypercorn's own run, with GuardedProtocol in place of its ProtocolWrapper.
        watched: tuple[int, Callable[[], None]] | None = None
        try:
            if isinstance(self.stream, trio.SSLStream):
                # A client that never completes its handshake holds a connection slot for
                # this long (`gateway.handshake_timeout`) at most.
                try:
                    with trio.fail_after(self.config.ssl_handshake_timeout):
                        await self.stream.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError):
                    return
                alpn_protocol = self.stream.selected_alpn_protocol()
                sock = self.stream.transport_stream.socket
                ssl = True
            else:
                alpn_protocol = "http/1.1"
                sock = self.stream.socket
                ssl = False
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            requests = InboxTaskGroup(self.hangups, self.join_next_write)
            async with requests as task_group:
                self._task_group = task_group
                on_hangup = requests.hang_up
                watched = self.hangups.watch(sock, on_hangup), on_hangup
                self.protocol = GuardedProtocol(
                    self.guard,
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    ssl,
                    client,
                    server,
                    self.protocol_send,
                    alpn_protocol,
                )
                await self.protocol.initiate()
                if not ssl and (data := read_now(sock, MAX_RECV)):
                    await self.protocol.handle(RawData(data))
                if not self._busy:
                    self._timer.start(task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass  # the client is gone
        finally:
            if watched is not None:
                self.hangups.forget(*watched)
            await self._close()

    async def _close(self) -> None:
        # Hypercorn's close sends EOF without its send lock: when h11 refuses what follows a
        # request (its own 400) while the app writes its response, the two sends collided and
        # one raised BusyResourceError (the client then got no answer at all).
        if self.send_lock.statistics().owner is trio.lowlevel.current_task():
            await super()._close()
            return
        async with self.send_lock:
            await super()._close()

    def join_next_write(self) -> None:
        """The next bytes written wait for the write after them and go out with them, in one
        send: a response's head and the body that follows it at once (HTTP/1.1, no TLS)."""
        if isinstance(self.stream, trio.SocketStream) and isinstance(
            self.protocol.protocol, GuardedH11Protocol
        ):
            self._join_next = True

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):  # Hypercorn's handling, with our timer
            self._busy = not event.idle
            if event.idle:
                self._timer.start(self._task_group, self._idle_timeout)
            else:
                self._timer.stop()
            return
        # Hypercorn's send of response bytes takes its lock and the stream's `send_all`, two
        # schedule points and a shielded scope per write (head, body, end: three per response).
        # On a plain socket, a write the kernel takes whole needs neither: it cannot block.
        stream = self.stream
        if not isinstance(stream, trio.SocketStream):
            await super().protocol_send(event)
            return
        if not isinstance(event, RawData):
            if self._held:  # never left behind: held bytes go before anything else
                held, self._held = self._held, b""
                await self._write(stream, held)
            await super().protocol_send(event)
            return
        data = event.data
        if self._join_next and data:
            self._join_next = False
            self._held = data
            return
        if self._held:
            data, self._held = self._held + data, b""
        if data:
            # Else the end of a body of known length: h11 has nothing to write. (A closed
            # socket is noticed by the next write or read, as Hypercorn's empty write would.)
            await self._write(stream, data)

    async def _write(self, stream: trio.SocketStream, data: bytes) -> None:
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:  # another write is under way: wait for it, Hypercorn's way
            await super().protocol_send(RawData(data=data))
            return
        try:
            if stream.socket.did_shutdown_SHUT_WR:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            sent = write_now(stream.socket, data)
            if sent < len(data):
                with trio.CancelScope(shield=True):  # as Hypercorn's: a write is never cut
                    await stream.send_all(memoryview(data)[sent:])
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())  # under the lock, as Hypercorn does
        finally:
            lock.release()

    async def _read_data(self) -> None:
        await super()._read_data()
        # The client has closed (or the read failed): there is no next request to wait for.
        self._timer.stop()


class _KeepAliveTimer:
    """Hypercorn's keep-alive timer of one connection, as its `TrioSingleTask` runs it (one task
    at a time, in a cancel scope), but started and stopped without waiting: Hypercorn's takes a
    lock for each and waits for the task to start (three schedule points to start, one to stop,
    where none is needed). A timer stopped before its task ran ends at that task's first
    checkpoint."""

    __slots__ = ("_scope",)

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None

    def start(self, task_group: TaskGroup, action: Callable[[], Awaitable[None]]) -> None:
        """Run `action` in a task of `task_group`, after cancelling the one running, if any."""
        self.stop()
        self._scope = trio.CancelScope()
        task_group.spawn(_timed, self._scope, action)

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None


async def _timed(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await action()


def _listeners(
    settings: hypercorn.config.Config,
    sockets: hypercorn.config.Sockets,
    slots: ConnectionSlots,
) -> tuple[list[Listener], list[str]]:
    listeners: list[Listener] = []
    urls = []
    if sockets.secure_sockets:
        # The cap sits below TLS: a refused connection costs no handshake.
        ssl_context = settings.create_ssl_context()
        assert ssl_context is not None  # Hypercorn makes secure sockets only with a certificate
        for sock in sockets.secure_sockets:
            capped = CappedListener(sock, slots)
            listeners.append(trio.SSLListener(capped, ssl_context, https_compatible=True))
            urls.append(f"https://{_address(sock)}")
    for sock in sockets.insecure_sockets:
        listeners.append(CappedListener(sock, slots))
        urls.append(f"http://{_address(sock)}")
    return listeners, urls


def _address(sock: socket.socket) -> str:
    return repr_socket_addr(sock.family, sock.getsockname())
