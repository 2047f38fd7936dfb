"""Hypercorn's keep-alive timer, kept by one task per worker instead of a task per request.

Hypercorn (0.18) starts a task with `nursery.start` each time a connection falls idle (when it
opens, and after each response) and cancels it when a request head arrives: for a stream on a
new connection, two tasks, two locks and their cancellations, more than the gateway's own work
per request. `ntonix serve`'s connections note here when they are idle instead, and one task
wakes every `tick` seconds to close those idle for `keep_alive_timeout`.

Invariants: only a connection idle since `keep_alive_timeout` ago or longer is closed (one whose
next request began meanwhile is left alone), within `tick` seconds of its time; once the worker
is terminated (draining), an idle connection is closed at once, as Hypercorn does; a connection
that has ended is forgotten.
"""

from __future__ import annotations

from typing import Protocol

import trio
from hypercorn.trio.worker_context import WorkerContext

# How often idle connections are looked at: the keep-alive timeout is that coarse.
TICK = 1.0


class KeptAlive(Protocol):
    def close_when_idle(self) -> None:
        """Start closing the connection; the closer asks `still_idle` first."""


class IdleConnections:
    """The connections of one worker that wait for their next request, since when."""

    def __init__(self, timeout: float, context: WorkerContext) -> None:
        self._since: dict[KeptAlive, float] = {}
        self._closing: set[KeptAlive] = set()
        self._timeout = timeout
        self._context = context
        self.tick = min(TICK, timeout / 4)

    def idle(self, connection: KeptAlive) -> None:
        if self._context.terminated.is_set():
            self._close(connection)
        else:
            self._since[connection] = trio.current_time()

    def busy(self, connection: KeptAlive) -> None:
        """A request began on it, or it ended: not idle (any more)."""
        self._since.pop(connection, None)
        self._closing.discard(connection)

    def still_idle(self, connection: KeptAlive) -> bool:
        """Asked by the closer: False if a request began since it was told to close."""
        return connection in self._closing

    def check(self, now: float) -> None:
        """Close those idle for the timeout (all of them once the worker is terminated)."""
        terminated = self._context.terminated.is_set()
        oldest = now - self._timeout
        for connection, since in list(self._since.items()):
            if terminated or since <= oldest:
                self._close(connection)

    def _close(self, connection: KeptAlive) -> None:
        self._since.pop(connection, None)
        self._closing.add(connection)
        connection.close_when_idle()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self.tick):
                await self._context.terminated.wait()
            self.check(trio.current_time())
            if self._context.terminated.is_set():
                await trio.sleep(self.tick)  # draining: `idle` closes the rest itself
