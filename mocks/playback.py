"""Playing a reply onto a connection: its delays, a hang, a drop, and a racing disconnect.

Invariants: the head goes out with the first body write (so time to first byte is the time to the
first chunk); a reply that waits at all races a watcher that returns when the client leaves, so a
disconnect is noticed within a scheduling tick even while the reply sleeps or hangs; the outcome
is decided once, and a completed reply is decided just before its last chunk is handed over.
"""

import enum
from collections.abc import Callable
from typing import Protocol

import trio

from .fin_clock import Clock
from .replies import Reply


class Outcome(enum.Enum):
    COMPLETED = "completed"  # the whole reply was handed to the server
    DISCONNECTED = "disconnected"  # the client left first
    DROPPED = "dropped"  # the mock aborted the connection, as `x-mock-drop-after` asked


class Connection(Protocol):
    """The client's end of one request, as each server exposes it."""

    def start(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        """Keep the response head; it goes out with the first `write`."""

    async def write(self, data: bytes, *, last: bool) -> bool:
        """Send the head if still kept, then `data`; False when the client is gone."""
        ...

    async def wait_disconnect(self) -> None:
        """Return once the client has gone away."""

    def closed_at(self) -> tuple[float, Clock] | None:
        """time.time() when the client's close reached the socket, and the clock that took
        it, if the server can tell (the lean server can, while a disconnect is waited for)."""


async def _play(reply: Reply, connection: Connection, end: Callable[[Outcome], None]) -> None:
    if reply.hang:
        await trio.sleep_forever()
    connection.start(reply.status, reply.headers)
    finish = reply.drop_after is None
    chunks = reply.chunks if reply.drop_after is None else reply.chunks[: reply.drop_after]
    for index, chunk in enumerate(chunks):
        if chunk.delay:  # skipping sleep(0) saves a trip through the scheduler per request
            await trio.sleep(chunk.delay)
        last = finish and index == len(chunks) - 1
        if last:
            # Ended before the write: the client may read the end before `write` returns, and
            # whoever it tells must find the request counted.
            end(Outcome.COMPLETED)
        if not await connection.write(chunk.data, last=last):
            end(Outcome.DISCONNECTED)
            return
    if finish:
        return
    # Even a drop after zero chunks sends the head: Hypercorn cannot abort before it.
    if not chunks and not await connection.write(b"", last=False):
        end(Outcome.DISCONNECTED)
        return
    end(Outcome.DROPPED)


async def play(
    reply: Reply, connection: Connection, on_end: Callable[[Outcome], None] = lambda _: None
) -> Outcome:
    """Write `reply` chunk by chunk, and stop early when the client goes away.

    `on_end` gets the outcome once, as soon as it is decided; it is not called when play is
    cancelled from outside.
    """
    outcome: Outcome | None = None

    def end(decided: Outcome) -> None:
        nonlocal outcome
        if outcome is None:
            outcome = decided
            on_end(decided)

    if not reply.hang and reply.duration == 0:
        # Nothing to wait for, so no watcher to pay for: a gone client shows up as a failed write.
        await _play(reply, connection, end)
    else:
        async with trio.open_nursery() as nursery:

            async def generate() -> None:
                await _play(reply, connection, end)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                await connection.wait_disconnect()
                end(Outcome.DISCONNECTED)
                nursery.cancel_scope.cancel()

            nursery.start_soon(generate)
            nursery.start_soon(watch)
    assert outcome is not None  # every way out of _play, and the watcher, decides one
    return outcome
