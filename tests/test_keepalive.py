"""The worker's keep-alive timer: which idle connections it closes, and when."""

from __future__ import annotations

import trio
import trio.testing
from hypercorn.trio.worker_context import WorkerContext

from ntonix.keepalive import IdleConnections


class FakeConnection:
    def __init__(self, idle: IdleConnections) -> None:
        self.watch = idle
        self.closed_at: float | None = None

    def close_when_idle(self) -> None:
        # As the worker's connection does, in a task of its own: it asks again first.
        if self.watch.still_idle(self):
            self.watch.busy(self)
            self.closed_at = trio.current_time()


async def test_a_connection_idle_for_the_timeout_is_closed_within_a_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    idle = IdleConnections(5.0, WorkerContext(max_requests=None))
    assert idle.tick == 1.0
    waiting, serving = FakeConnection(idle), FakeConnection(idle)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle.run)
        idle.idle(waiting)
        idle.idle(serving)
        await trio.sleep(3.0)
        idle.busy(serving)  # its next request began
        await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    assert waiting.closed_at is not None and 5.0 <= waiting.closed_at <= 6.0
    assert serving.closed_at is None


async def test_a_request_beginning_after_the_close_was_decided_keeps_its_connection() -> None:
    idle = IdleConnections(5.0, WorkerContext(max_requests=None))
    late = FakeConnection(idle)
    late.close_when_idle = lambda: None  # type: ignore[method-assign]  # the closer runs later
    idle.idle(late)
    idle.check(trio.current_time() + 6.0)
    assert idle.still_idle(late)
    idle.busy(late)  # the request head arrived before the closer ran
    assert not idle.still_idle(late)


async def test_once_terminated_idle_connections_close_at_once() -> None:
    context = WorkerContext(max_requests=None)
    idle = IdleConnections(5.0, context)
    before, after = FakeConnection(idle), FakeConnection(idle)
    idle.idle(before)
    await context.terminated.set()
    idle.check(trio.current_time())
    idle.idle(after)
    assert before.closed_at is not None
    assert after.closed_at is not None
