"""The parent of N worker processes: it keeps them running and passes signals on.

Invariants this module owns:
- Signal handlers do nothing but note the signal (the wake-up descriptor carries its number):
  every action is taken in the supervisor's loop, outside any handler.
- SIGHUP is passed on to every running worker (each reloads its config); SIGINT or SIGTERM
  stops them all once: the stop pipe closes (each drains), the listening sockets close, and a
  worker still running `graceful_timeout` + WORKER_EXIT_MARGIN later is killed.
- A worker that dies while the gateway runs is replaced when `RestartPolicy` says (at once the
  first time, then with a growing back-off); one that keeps dying stops the gateway, exit 1.
- While stopping, nothing is replaced; the exit code is 1 if a worker failed or was killed.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import cast

from ntonix.core.restarts import RestartPolicy

log = logging.getLogger("ntonix.server")

# After a stop, how long past graceful_timeout the workers have for their lifespan shutdown and
# exit before they are killed.
WORKER_EXIT_MARGIN = 10.0
# The signals the parent of N workers acts on.
WORKER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# When a worker that died is replaced, and when the gateway gives up (ntonix/core/restarts.py).
RESTARTS = RestartPolicy()


class Supervisor:
    """Keeps N workers running: a worker that dies is replaced (`RestartPolicy` says when, or
    that it keeps dying and the gateway stops); SIGINT or SIGTERM stops them all, and SIGHUP is
    passed on to each. Closing `stop` asks the workers to drain (their parent dying does too)."""

    def __init__(
        self,
        start: Callable[[int], BaseProcess],
        stop: Connection,
        graceful_timeout: float,
        restarts: RestartPolicy,
    ) -> None:
        self._start = start
        self._stop = stop
        self._graceful_timeout = graceful_timeout
        self._restarts = restarts
        self._started: dict[int, float] = {}
        self._in_a_row: dict[int, int] = {}
        self._due: dict[int, float] = {}  # replacements waiting for their back-off
        self.deadline: float | None = None  # set once stopping: when the workers get killed

    def run(self, processes: dict[int, BaseProcess], stop_listening: Callable[[], None]) -> int:
        # The signal handlers do nothing: the wake-up descriptor carries the signal numbers to
        # this loop, which acts outside any handler.
        wakeup, wakeup_writer = socket.socketpair()
        wakeup.setblocking(False)
        wakeup_writer.setblocking(False)
        for signum in WORKER_SIGNALS:
            signal.signal(signum, _noted)
        previous_wakeup = signal.set_wakeup_fd(wakeup_writer.fileno())
        self._started = dict.fromkeys(processes, time.monotonic())
        try:
            return self._loop(dict(processes), wakeup, stop_listening)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            wakeup.close()
            wakeup_writer.close()

    def _loop(
        self,
        running: dict[int, BaseProcess],
        wakeup: socket.socket,
        stop_listening: Callable[[], None],
    ) -> int:
        failed = False
        while running or (self._due and self.deadline is None):
            wake_at = [*self._due.values(), *([self.deadline] if self.deadline else [])]
            timeout = max(0.0, min(wake_at) - time.monotonic()) if wake_at else None
            sentinels = [process.sentinel for process in running.values()]
            multiprocessing.connection.wait([wakeup, *sentinels], timeout)
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline and running:
                log.error("workers still running long after the stop: killing them")
                for process in running.values():
                    process.kill()
                    process.join()
                return 1
            for number in _signals_received(wakeup):
                if number == signal.SIGHUP:
                    for process in running.values():
                        with suppress(ProcessLookupError):
                            os.kill(cast(int, process.pid), signal.SIGHUP)
                elif self.deadline is None:
                    self._stop_all(signal.Signals(number).name, stop_listening)
            dead = [(index, proc) for index, proc in running.items() if proc.exitcode is not None]
            for index, process in dead:
                del running[index]
                process.join()
                if self.deadline is not None:  # stopping: no replacement
                    if process.exitcode != 0:
                        log.error("%s failed (exit code %s)", process.name, process.exitcode)
                        failed = True
                elif not self._replace(index, process, now):
                    failed = True
                    self._stop_all(f"{process.name} keeps dying", stop_listening)
            for index, due in list(self._due.items()):
                if due <= now and self.deadline is None:
                    del self._due[index]
                    running[index] = self._start(index)
                    self._started[index] = time.monotonic()
                    log.info("%s replaced (pid %s)", running[index].name, running[index].pid)
        return 1 if failed else 0

    def _replace(self, index: int, process: BaseProcess, now: float) -> bool:
        """Schedule the replacement of a worker that died; False when it keeps dying."""
        lived = now - self._started[index]
        restart = self._restarts.after_death(self._in_a_row.get(index, 0), lived)
        self._in_a_row[index] = restart.in_a_row
        how = f"exit code {process.exitcode}"
        delay = restart.delay
        if delay is None:
            log.error(
                "%s died %d times in a row, each within %g s of its start (last: %s): "
                "not replacing it again; the gateway stops",
                process.name,
                restart.in_a_row,
                self._restarts.stable_after,
                how,
            )
            return False
        log.error("%s died (%s) after %.1f s: replaced in %g s", process.name, how, lived, delay)
        self._due[index] = now + delay
        return True

    def _stop_all(self, reason: str, stop_listening: Callable[[], None]) -> None:
        log.info("%s: the workers drain for up to %g s", reason, self._graceful_timeout)
        self._due.clear()
        self._stop.close()
        stop_listening()
        self.deadline = time.monotonic() + self._graceful_timeout + WORKER_EXIT_MARGIN


def _noted(signum: int, frame: object) -> None:
    """A handler that does nothing: installing it makes the wake-up descriptor see the signal."""


def _signals_received(wakeup: socket.socket) -> list[int]:
    """The numbers of the signals caught since the last call, one byte each."""
    received = b""
    with suppress(BlockingIOError):
        while data := wakeup.recv(512):
            received += data
    return list(received)
