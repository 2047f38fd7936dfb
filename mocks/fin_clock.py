"""When a client's close reached the lean mock's socket, apart from when the mock noticed it.

The mock notices a client leaving in its Trio loop: after the batch under way (under the
benchmark's hang-up load, a hundred token writes) and at its watcher's turn in the next. That
reaction time is the mock's, not the gateway's, yet it was part of every "client close -> mock
noticed" figure (docs/BENCHMARKS.md, "The hang-up path"). So each close is timed apart from the
loop, by the first of two clocks the process can have:

- *kernel*: the close's FIN or RST segment as it passed over loopback, stamped by the kernel
  (mocks/fin_packets.py). Exact to microseconds whatever the process is doing; needs
  CAP_NET_RAW.
- *thread*: a thread of its own blocked in an epoll set of the streaming sockets, for
  EPOLLRDHUP alone, noting time.time() when it runs again. It needs a core and the GIL first:
  under the hang-up load on two busy cores that was p99 4-18 ms late, and for 10-30% of the
  closes later than the loop itself (docs/BENCHMARKS.md, "The hang-up path with two workers").

Invariants: a watched socket gets at most one time, from a close that came after `watch`; the
kernel clock times only connections to a port opened with `listen`;
`forget` before the socket closes or serves its next request; with neither clock (not Linux)
no time is taken and callers fall back on their own.
"""

import select
import threading
import time
from typing import Literal

import trio

from .fin_packets import FinTap, open_tap

Clock = Literal["kernel", "thread"]
_Ends = tuple[int, tuple[str, int]]  # the local port and the peer's address


class FinClock:
    def __init__(self) -> None:
        self._taps: dict[int, FinTap | None] = {}  # by listening port, None where none can be had
        # Tapped sockets: fd -> (local port and peer address, time.time() at `watch`), and
        # the other way round, to match segments by.
        self._peers: dict[int, tuple[_Ends, float]] = {}
        self._fds_by_peer: dict[_Ends, int] = {}
        self._tapped_at: dict[int, float] = {}
        # The thread's sockets, where no tap could be had.
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._lock = threading.Lock()  # the thread's notes and the loop's forgetting
        self._watched: set[int] = set()
        self._closed_at: dict[int, float] = {}
        self._thread: threading.Thread | None = None

    def listen(self, port: int) -> None:
        """Open the kernel clock for connections to `port`, if the process may: once, when
        the server starts listening, so that its descriptor is there from the start."""
        if port not in self._taps:
            self._taps[port] = open_tap(port)

    def unlisten(self, port: int) -> None:
        """Once the server stops listening on `port`: its connections are timed no more."""
        tap = self._taps.pop(port, None)
        if tap is not None:
            tap.close()

    def watch(self, sock: trio.socket.SocketType) -> None:
        """Note when the peer closes `sock` (again for the same socket: nothing more)."""
        fd = sock.fileno()
        if fd in self._peers or fd in self._watched:
            return
        local_port = sock.getsockname()[1]
        if self._taps.get(local_port) is not None:
            ends = (local_port, sock.getpeername()[:2])  # kept: a reset socket cannot tell
            self._peers[fd] = (ends, time.time())
            self._fds_by_peer[ends] = fd
            return
        if self._epoll is None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fin-clock", daemon=True)
            self._thread.start()
        with self._lock:
            self._watched.add(fd)
        self._epoll.register(fd, select.EPOLLRDHUP | select.EPOLLONESHOT)

    def closed_at(self, sock: trio.socket.SocketType) -> tuple[float, Clock] | None:
        """time.time() when the peer's close reached `sock`, if it has, and which clock took
        it."""
        fd = sock.fileno()
        if fd in self._peers:
            self._drain()
            at = self._tapped_at.get(fd)
            return None if at is None else (at, "kernel")
        at = self._closed_at.get(fd)
        return None if at is None else (at, "thread")

    def forget(self, sock: trio.socket.SocketType) -> None:
        fd = sock.fileno()
        if fd in self._peers:
            self._drain()  # closes queued now are this connection's, not a later one's
            ends, _ = self._peers.pop(fd)
            if self._fds_by_peer.get(ends) == fd:
                del self._fds_by_peer[ends]
            self._tapped_at.pop(fd, None)
            return
        with self._lock:
            if fd not in self._watched:
                return
            self._watched.discard(fd)
            self._closed_at.pop(fd, None)
        assert self._epoll is not None  # nothing is watched without it
        self._epoll.unregister(fd)

    def _drain(self) -> None:
        for port, tap in self._taps.items():
            for peer, at in tap.drain() if tap is not None else ():
                fd = self._fds_by_peer.get((port, peer))
                # A later segment (a reset after the FIN) or one from before `watch` (the
                # previous connection from the same address) is not this close.
                if fd is not None and fd not in self._tapped_at and at >= self._peers[fd][1]:
                    self._tapped_at[fd] = at

    def _run(self) -> None:
        assert self._epoll is not None
        while True:
            events = self._epoll.poll()
            now = time.time()
            with self._lock:
                for fd, _ in events:
                    if fd in self._watched:  # not forgotten since the kernel reported it
                        self._closed_at[fd] = now


FIN_CLOCK = FinClock()  # one per process: the lean server's connections share it
