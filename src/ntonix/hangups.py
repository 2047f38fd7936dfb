"""The worker's hang-up watch: a client's close acted on before the scheduler's next batch.

Hypercorn learns that a client left when its connection's reader task reads the EOF. Under
load that read waits twice: for the scheduler batch under way to end (hundreds of steps of
relayed chunks and unwinding requests), then for the reader's turn in the next batch. Under
the benchmark's hang-up load each wait was 5 to 30 ms (docs/BENCHMARKS.md, "The hang-up
path"), all of it before the backend could stop generating. So every connection's socket is
also in a second epoll set, for EPOLLRDHUP alone (the peer's FIN or reset; arriving data does
not wake it). This instrument asks that set, without waiting, right after each of Trio's own
I/O waits, and runs the hang-up callback of each connection found closed right there: its
requests are cancelled and their upstream sockets closed before any task of the next batch
runs. A batch under load is itself tens of milliseconds of work, so a close that arrives during
one is also looked for from inside it: each relayed chunk's write (`Downstream.write`) calls
`check`, which asks the set at most once every `CHECK_INTERVAL`, and so does each request's
teardown (`downstream._InboxWatch`): when many clients leave together, the batch that unwinds
their requests holds no writes. Hypercorn's reader then reads the EOF as before, and its
disconnect message finds the requests already cancelled.

Clients that leave together are found in one look. Each callback closes its upstream sockets at
once and hands the rest (cancelling its requests: Trio's cancel delivery, the request's record)
to `after_closes`, which runs it once every callback of that look has run: the last of a
hundred closes found together waits for ninety-nine socket closes, not for ninety-nine
requests' cancellations as well (docs/BENCHMARKS.md, "The hang-up path with two workers").

Invariants: a callback runs at most once per watched socket (EPOLLONESHOT), only while it is
watched, between task steps or inside a write (where it may cancel that very request: its client
may be the one gone); what it hands to `after_closes` runs before the look returns, in order;
outside a look `after_closes` runs it at once; one that raises is logged and the watch goes on
(Trio would drop an instrument that raises). The set is asked only while some socket is
watched, after every I/O wait and at most every `CHECK_INTERVAL` besides. Without epoll (not
Linux) nothing is watched and the reader alone reports hang-ups.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable

import trio

log = logging.getLogger("ntonix.server")

# How often a batch under way looks for closes, at most (one epoll_wait(0): about a microsecond).
CHECK_INTERVAL = 0.001


class HangupWatch(trio.abc.Instrument):
    """One per worker: `serve_worker` adds it to the worker's Trio run as an instrument and
    `_TCPServer` watches each connection's socket, with its task group's `hang_up`."""

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next_check = 0.0  # time.perf_counter() from when `check` looks again
        self._after_closes: list[Callable[[], None]] | None = None  # during a look

    def watch(self, sock: trio.socket.SocketType, on_hangup: Callable[[], None]) -> int:
        """Call `on_hangup` as soon as the peer closes `sock` (or resets it); returns the key
        to `forget` it by."""
        if self._epoll is None:
            return -1
        fd = sock.fileno()
        self._epoll.register(fd, select.EPOLLRDHUP | select.EPOLLONESHOT)
        self._callbacks[fd] = on_hangup
        return fd

    def forget(self, fd: int, on_hangup: Callable[[], None]) -> None:
        """Once the connection ends. Its registration leaves the set with the descriptor (the
        kernel drops a closed file from every epoll set), so this costs no system call. The
        callback must match: Hypercorn may have closed the socket already, and its number may
        now be a new connection's."""
        if self._callbacks.get(fd) is on_hangup:
            del self._callbacks[fd]

    def after_io_wait(self, timeout: float) -> None:
        self._act()

    def check(self) -> None:
        """From inside a batch: act on closes if the last look was `CHECK_INTERVAL` ago."""
        if self._callbacks and time.perf_counter() >= self._next_check:
            self._act()

    def after_closes(self, action: Callable[[], None]) -> None:
        """Run `action` once the callbacks of the look under way have run (now, outside a
        look): a callback's work that can wait for the other clients' upstream closes."""
        if self._after_closes is None:
            action()
        else:
            self._after_closes.append(action)

    def _act(self) -> None:
        if not self._callbacks:
            return
        assert self._epoll is not None  # nothing is watched without it
        self._next_check = time.perf_counter() + CHECK_INTERVAL
        closed = self._epoll.poll(0)
        if not closed:
            return
        later: list[Callable[[], None]] = []
        self._after_closes = later
        try:
            for fd, _ in closed:
                on_hangup = self._callbacks.pop(fd, None)
                if on_hangup is not None:
                    _run_logged(on_hangup)
        finally:
            self._after_closes = None
        for action in later:
            _run_logged(action)

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


def _run_logged(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:
        log.exception("hang-up callback failed; the disconnect message will run it again")
