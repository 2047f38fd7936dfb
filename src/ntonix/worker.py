"""One serving worker: Hypercorn's HTTP machinery behind our own listeners.

Hypercorn's `worker_serve` builds its listeners itself and has no connection cap (and ASGI
never sees connections), so this runs its parts ourselves: the lifespan, Hypercorn's TCPServer
for each connection (speaking HTTP/2 through `protocols.GuardedH2Protocol`), and a
`CappedListener` in front of every socket. The lifespan outlives the listeners: it starts
before the first accept and shuts down after the drain.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import hypercorn.config
import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr, repr_socket_addr

from ntonix.hangups import HangupWatch
from ntonix.inbox import InboxTaskGroup
from ntonix.listening import CappedListener, ConnectionSlots
from ntonix.plain_socket import read_now, write_now
from ntonix.protocol_h11 import GuardedH11Protocol
from ntonix.protocols import Guard, GuardedProtocol

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
            idle = IdleConnections()
            tcp_server = partial(
                _TCPServer,
                guard,
                hangups,
                idle,
                app,
                settings,
                context,
                ConnectionState(state.copy()),
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
                # Idle keep-alive connections close now, and each busy one after its current
                # request (Hypercorn's protocols see `terminated`).
                await context.terminated.set()
                idle.close_all()
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


class IdleConnections:
    """The worker's client connections that wait for their next request, so that the worker's
    shutdown closes them at once (as Hypercorn's keep-alive tasks did, each waiting for it)."""

    def __init__(self) -> None:
        self.waiting: set[_TCPServer] = set()

    def close_all(self) -> None:
        for connection in list(self.waiting):
            connection.stop_waiting()


class _TCPServer(TCPServer):
    """Hypercorn's handler of one connection, with HTTP/2 guarded (`protocols`), its socket in
    the worker's hang-up watch (`hangups`), ending as soon as the client has closed it, and
    writing to a plain socket without waiting when it can.

    The keep-alive timeout (a connection idle between requests for `keep_alive_timeout` is
    closed) is the deadline of the connection's own read, not Hypercorn's task: Hypercorn starts
    a task for every idle spell (at the connection's start and after each response), through
    `nursery.start` and a lock, and cancels it at the next request: per new stream two tasks,
    six cancel scopes and four deadline changes of its thirteen and six (`bench.counts`), about
    60 µs a spell (docs/BENCHMARKS.md, "Fifth round"). The reader waits in that read whenever
    the connection is idle; the deadline moves with Hypercorn's `Updated` events.
    Hypercorn 0.18's own handler also waited out that timer (5 s) after the client closed an
    idle connection: the socket, and its slot of max_connections, stayed taken that long.
    """

    def __init__(
        self,
        guard: Guard,
        hangups: HangupWatch,
        idle: IdleConnections,
        app: AppWrapper,
        config: hypercorn.config.Config,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SSLStream[trio.SocketStream],
    ) -> None:
        super().__init__(app, config, context, state, stream)
        self.guard = guard
        self.hangups = hangups
        self.idle = idle
        self._join_next = False  # see `join_next_write`
        self._held = b""  # written with the next write
        # When the connection, idle, is closed; inf while a request is under way.
        self._idle_until = math.inf
        self._read_by = math.inf  # Hypercorn's read_timeout, if set, for the read under way
        self._reading: trio.CancelScope | None = None  # the read under way

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
                self._set_idle(True)
                if not ssl and (data := read_now(sock, MAX_RECV)):
                    # The request that came with the connection starts now: Trio's read would
                    # first yield a pass, behind every other connection's ready work.
                    await self.protocol.handle(RawData(data))
                await self._read_data()
        except OSError:
            pass  # the client is gone
        finally:
            self.idle.waiting.discard(self)
            if watched is not None:
                self.hangups.forget(*watched)
            await self._close()
            self._unlink()

    def _unlink(self) -> None:
        """Drops the links from this handler to its protocol and task group, which hold its
        bound methods: the connection's objects are then freed as it ends, not left for the
        garbage collector (docs/BENCHMARKS.md, "Fifth round")."""
        vars(self).pop("protocol", None)  # unset if the TLS handshake failed
        vars(self).pop("_task_group", None)

    async def _close(self) -> None:
        # Hypercorn's close sends EOF without its send lock: when h11 refuses what follows a
        # request (its own 400) while the app writes its response, the two sends collided and
        # one raised BusyResourceError (the client then got no answer at all).
        stream = self.stream
        owner = self.send_lock.statistics().owner
        mine = owner is trio.lowlevel.current_task()
        if isinstance(stream, trio.SocketStream) and (mine or owner is None):
            # Nothing is being written: EOF and close now, which Hypercorn's `send_eof` and
            # `aclose` (and the lock) did in three schedule points per connection, a third of
            # a 1-token stream's handler steps (docs/BENCHMARKS.md, "Fifth round").
            sock = stream.socket
            if sock.fileno() != -1 and not sock.did_shutdown_SHUT_WR:
                with contextlib.suppress(OSError):  # the client may be gone already
                    sock.shutdown(socket.SHUT_WR)
            sock.close()
            return
        if mine:
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
        # Hypercorn's send of response bytes takes its lock and the stream's `send_all`, two
        # schedule points and a shielded scope per write (head, body, end: three per response).
        # On a plain socket, a write the kernel takes whole needs neither: it cannot block.
        stream = self.stream
        if isinstance(stream, trio.SocketStream) and not isinstance(event, RawData) and self._held:
            held, self._held = self._held, b""  # never left behind: before anything else
            await self._write(stream, held)
        if isinstance(event, Updated):  # Hypercorn's keep-alive task's start or stop
            self._set_idle(event.idle)
            return
        if not isinstance(stream, trio.SocketStream) or not isinstance(event, RawData):
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

    def _set_idle(self, idle: bool) -> None:
        """The connection waits for a request (from now, for `keep_alive_timeout`; at once
        when the worker is stopping), or has one under way."""
        if idle:
            if self.context.terminated.is_set():
                self._idle_until = -math.inf
            else:
                self._idle_until = trio.current_time() + self.config.keep_alive_timeout
            self.idle.waiting.add(self)
        else:
            self._idle_until = math.inf
            self.idle.waiting.discard(self)
        if self._reading is not None:
            self._reading.deadline = min(self._idle_until, self._read_by)

    def stop_waiting(self) -> None:
        """The worker is stopping: an idle connection closes now."""
        self._set_idle(True)

    async def _read_data(self) -> None:
        # Hypercorn's read loop, each read under the keep-alive deadline (and Hypercorn's
        # read_timeout, if set); past either, the connection closes, as Hypercorn's did.
        read_timeout = self.config.read_timeout
        while True:
            self._read_by = trio.current_time() + read_timeout if read_timeout else math.inf
            data = None
            with trio.CancelScope(deadline=min(self._idle_until, self._read_by)) as reading:
                self._reading = reading
                try:
                    data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    pass
                finally:
                    self._reading = None
            if data is None:  # the read failed, or its deadline passed
                if trio.current_time() >= self._idle_until:
                    # Idle too long, or the worker stops: closed at once, as Hypercorn's
                    # keep-alive task did (a client reusing the connection now sees it closed).
                    with trio.CancelScope(shield=True):
                        await self._initiate_server_close()
                break
            await self.protocol.handle(RawData(bytes(data)))
            if not data:
                break
        # The client has closed, the read failed or timed out: no next request to wait for.
        self.idle.waiting.discard(self)
        await self.protocol.handle(Closed())


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
