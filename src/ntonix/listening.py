"""The front door's listening sockets: the client send timeout and the connection cap.

Invariants:
- At most `limit` client connections are open, and at most `per_client` of them from one
  client address (in this worker): `ConnectionSlots.take()` is the only way in, and each
  successful `take()` is matched by exactly one `free()`, when the handler of that connection
  ends, however it ends.
- A connection past the limit is accepted and reset at once, so the client learns it was
  refused instead of waiting in the kernel's backlog.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Awaitable, Callable, MutableSequence

import trio

from ntonix.core.budgets import ClientConnections

log = logging.getLogger("ntonix.listening")

# How long a client may leave sent data unacknowledged (or its receive window shut) before the
# kernel aborts the connection. Hypercorn writes inside a shielded cancel scope and has no write
# timeout, so without this a client that stops reading pins its handler (and its upstream) for
# ever. Idle streams are not affected: the clock runs only while data waits to be delivered.
# 0 leaves the kernel's default (no such timeout).
CLIENT_SEND_TIMEOUT = 30.0

# At most one warning per this many seconds about refused connections, with their number: a
# flood of refusals must not become a flood of log lines.
REFUSAL_WARNING_INTERVAL = 10.0

# accept() failures that concern one connection already gone, not the listening socket.
_GONE_BEFORE_ACCEPT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

ClientStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """TCP_USER_TIMEOUT on a listening socket; the sockets it accepts inherit it (Linux)."""
    if _is_tcp(sock):  # a unix socket has no such timeout
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(seconds * 1000))


def set_send_timeout_on_listening_sockets(seconds: float = CLIENT_SEND_TIMEOUT) -> int:
    """TCP_USER_TIMEOUT on every listening TCP socket this process holds; returns how many.

    For the plain `hypercorn ... ntonix:app` command, whose sockets Hypercorn creates (in its
    parent process, before it spawns the worker that calls this) without the option.
    """
    if sys.platform != "linux":
        return 0
    count = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            # fromfd works on a duplicate, so closing it leaves the server's descriptor open;
            # an option set through either applies to the one socket both refer to.
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
                if _is_tcp(sock) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    set_send_timeout(sock, seconds)
                    count += 1
        except OSError:
            continue  # closed meanwhile, such as the descriptor that listed the directory
    return count


def _is_tcp(sock: socket.socket) -> bool:
    """Whether the kernel says so: `sock.family` is whatever `fromfd` was told."""
    if sys.platform != "linux":
        return False  # TCP_USER_TIMEOUT is Linux's
    family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    return family in (socket.AF_INET, socket.AF_INET6) and kind == socket.SOCK_STREAM


class ConnectionSlots:
    """The client connections open at once, at most `limit`, and at most `per_client` (0: no
    such limit) from one client address.

    `counts` holds one count per worker process, in memory they share; each worker writes only
    its own (`index`) and reads the sum. So the limit is the gateway's, whatever the number of
    workers; workers accepting at the same instant may pass it by one each, for that instant.
    The count per client address is this worker's own: with N workers one address may hold up
    to N times `per_client` (the kernel spreads its connections over the workers).
    """

    def __init__(
        self,
        limit: int,
        *,
        per_client: int = 0,
        counts: MutableSequence[int] | None = None,
        index: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.refused = 0  # by this worker, since start
        self._per_client = ClientConnections(per_client)
        self._counts = [0] if counts is None else counts
        self._index = index
        self._clock = clock
        self._warned_at: float | None = None
        self._refused_before_warning = 0
        # The client address each accepted connection counts against, until its handler ends.
        self._client_of: dict[trio.SocketStream, str] = {}

    @property
    def open(self) -> int:
        """Open in every worker."""
        return sum(self._counts)

    def take(self, client: str = "") -> bool:
        """A slot for a new connection from `client`; False (counted, maybe logged) at either
        limit."""
        open_now = self.open
        if open_now >= self.limit:
            self._refuse(f"max_connections reached ({open_now} open)")
            return False
        if not self._per_client.take(client):
            limit = self._per_client.limit
            self._refuse(f"max_connections_per_client ({limit}) reached by {client}")
            return False
        self._counts[self._index] += 1
        return True

    def free(self, client: str = "") -> None:
        self._counts[self._index] -= 1
        self._per_client.release(client)

    def accepted(self, stream: trio.SocketStream, client: str) -> None:
        """`stream` holds the slot `take(client)` gave; `holding` frees it."""
        self._client_of[stream] = client

    def _refuse(self, reason: str) -> None:
        self.refused += 1
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= REFUSAL_WARNING_INTERVAL:
            log.warning(
                "%s: refused %d new connection(s), %d in all",
                reason,
                self.refused - self._refused_before_warning,
                self.refused,
            )
            self._warned_at = now
            self._refused_before_warning = self.refused

    def holding(
        self, handler: Callable[[ClientStream], Awaitable[object]]
    ) -> Callable[[ClientStream], Awaitable[None]]:
        """`handler`, giving its connection's slot back when it ends.

        `trio.serve_listeners` starts one handler for each stream a listener accepted (the task
        runs its first step even when cancelled at once), so this frees exactly the slot that
        `CappedListener.accept` took.
        """

        async def handle(stream: ClientStream) -> None:
            transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
            client = self._client_of.pop(transport, "")
            try:
                await handler(stream)
            finally:
                self.free(client)

        return handle


class CappedListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts from a listening socket while `slots` has room, and past the limit accepts each
    new connection and resets it. Other worker processes may accept from the same socket."""

    def __init__(self, sock: socket.socket, slots: ConnectionSlots) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._slots = slots

    async def accept(self) -> trio.SocketStream:
        # As Trio's own listener does: a connection already pending is taken at once, and only
        # an empty backlog is waited on. Waiting first cost an epoll round per connection, and
        # with N workers on one socket each wait wakes every worker for each connection, all
        # but one of them to find nothing.
        await trio.lowlevel.checkpoint()
        while True:
            if self.socket.fileno() == -1:
                raise trio.ClosedResourceError("the listener was closed")
            stream = self._take_pending()
            if stream is not None:
                return stream
            await trio.lowlevel.wait_readable(self.socket)

    def _take_pending(self) -> trio.SocketStream | None:
        """The first pending connection that gets a slot; those past the limit are reset at
        once, all of them, without waiting in between. None when nothing is pending (or
        another worker took it)."""
        while True:
            try:
                connection, address = self.socket.accept()
            except BlockingIOError:
                return None
            except OSError as error:
                if error.errno in _GONE_BEFORE_ACCEPT:
                    continue
                raise
            client = _host(address)
            if self._slots.take(client):
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(connection))
                self._slots.accepted(stream, client)
                return stream
            _reset(connection)

    async def aclose(self) -> None:
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)  # wakes an accept() waiting on it
            self.socket.close()
        await trio.lowlevel.checkpoint()


def _host(address: object) -> str:
    """The client's IP address; "" for a unix socket's peer (one local client)."""
    return address[0] if isinstance(address, tuple) else ""


def _reset(connection: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the client sees ECONNRESET at once, and the refused
    connection leaves no TIME_WAIT state behind on the gateway."""
    with contextlib.suppress(OSError):  # the client may be gone already
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()
