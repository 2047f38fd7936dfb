"""When a client's close reached the lean mock's socket, apart from when the mock noticed it.

The mock notices a client leaving in its Trio loop: after the batch under way (under the
benchmark's hang-up load, a hundred token writes) and at its watcher's turn in the next. That
reaction time is the mock's, not the gateway's, yet it was part of every "client close -> mock
noticed" figure (docs/BENCHMARKS.md, "The hang-up path"). A thread of its own blocks in an
epoll set of the sockets of streaming replies, for EPOLLRDHUP alone (the peer's FIN or reset),
and notes the wall-clock time as the kernel reports the close, whatever the loop is doing.

Invariants: a watched socket gets at most one time (EPOLLONESHOT), taken when the thread holds
the GIL again after epoll returns (the loop gives it up at every system call: microseconds, at
worst the interpreter's switch interval); `forget` before the socket closes or serves its next
request; without epoll (not Linux) no time is taken and callers fall back on their own.
"""

import select
import threading
import time

import trio


class FinClock:
    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._lock = threading.Lock()  # the thread's notes and the loop's forgetting
        self._watched: set[int] = set()
        self._closed_at: dict[int, float] = {}
        self._thread: threading.Thread | None = None

    def watch(self, sock: trio.socket.SocketType) -> None:
        """Note when the peer closes `sock` (again for the same socket: nothing more)."""
        fd = sock.fileno()
        if self._epoll is None or fd in self._watched:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fin-clock", daemon=True)
            self._thread.start()
        with self._lock:
            self._watched.add(fd)
        self._epoll.register(fd, select.EPOLLRDHUP | select.EPOLLONESHOT)

    def closed_at(self, sock: trio.socket.SocketType) -> float | None:
        """time.time() when the peer's close reached `sock`, if it has."""
        return self._closed_at.get(sock.fileno())

    def forget(self, sock: trio.socket.SocketType) -> None:
        fd = sock.fileno()
        with self._lock:
            if fd not in self._watched:
                return
            self._watched.discard(fd)
            self._closed_at.pop(fd, None)
        assert self._epoll is not None  # nothing is watched without it
        self._epoll.unregister(fd)

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
