"""A request's ASGI `receive` that can also tell the app, at once, that its client has left.

Hypercorn reports a disconnect only as a message to `receive()`, so a request that must react
to its client leaving while it streams would need a task of its own blocked in `receive()`:
one more task, its cancel scope and its wake-ups for every request. `ntonix serve` hands each
request an `Inbox` instead (its worker's connections spawn apps through `InboxTaskGroup`):
the same queue, plus one callback that Hypercorn's own `http.disconnect` runs synchronously as
it is queued. The plain `hypercorn` command hands out its queue's `receive`; the app then
watches with a task, as before (`downstream.cancelled_on_disconnect`).

Its queue is a plain list with the one waiting reader (and any writer waiting for room)
parked on Trio's low-level primitives, not a memory channel: the channel's state, its two ends
and their task tables cost about 1.2 KiB and a generic alias per request, for a queue that
holds one or two messages. Neither end yields when it need not wait (Hypercorn's read loop and
the app both reach a schedule point at their next socket call).

The worker's hang-up watch (`hangups.py`) may see the client's close before Hypercorn's reader
does: it calls `hang_up` on every inbox of the connection that has a callback (its task group
keeps them), which runs the callback at once; Hypercorn's disconnect message comes later and is
queued as usual.

Invariants: every message still reaches `receive()` in order (the callback comes on top);
the callback runs at most once, for whichever comes first, `hang_up` or the disconnect message;
a callback set after either runs at once; at most one callback is set; at most `size` messages
wait (at least one), a writer beyond that waits for the reader; one task reads at a time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.typing import AppWrapper, ASGIReceiveCallable

from ntonix.hangups import HangupWatch

Message = dict[str, Any]

# Set in a request message by our HTTP/1.1 protocol when a chunk's declared size puts the body
# past `max_request_body` before its bytes arrive: the app answers 413 at once, as for a body
# that grew past the limit (`downstream.read_body`), in its client's dialect and with its log
# line. A message of ours, not ASGI's: only `ntonix serve`'s protocol sends it.
BODY_OVER_LIMIT = "ntonix.body_over_limit"


class Inbox:
    """The messages of one request, with an optional callback for its disconnect."""

    __slots__ = (
        "_messages",
        "_on_disconnect",
        "_reader",
        "_size",
        "_writers",
        "disconnected",
        "group",
        "join_next_write",
    )

    def __init__(
        self,
        size: int,
        group: InboxTaskGroup | None = None,
        join_next_write: Callable[[], None] | None = None,
    ) -> None:
        self.group = group  # the connection's, which `hang_up`s the inboxes with a callback
        # From the connection: the response's next write waits to go out with the one after.
        self.join_next_write = join_next_write
        self._messages: list[Message] = []
        self._size = max(size, 1)
        self._reader: trio.lowlevel.Task | None = None
        self._writers: list[trio.lowlevel.Task] = []
        self._on_disconnect: Callable[[], None] | None = None
        self.disconnected = False

    async def __call__(self) -> Message:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._messages:
            if self._reader is not None:
                raise trio.BusyResourceError("another task is already receiving this request")
            self._reader = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._reader = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        if self._writers:
            trio.lowlevel.reschedule(self._writers.pop(0))
        return self._messages.pop(0)

    async def put(self, message: Message) -> None:
        if message["type"] == "http.disconnect" and not self.disconnected:
            self.disconnected = True
            if self._on_disconnect is not None:
                self._on_disconnect()
        await trio.lowlevel.checkpoint_if_cancelled()
        while len(self._messages) >= self._size:
            writer = trio.lowlevel.current_task()
            self._writers.append(writer)

            def abort(_: object, writer: trio.lowlevel.Task = writer) -> trio.lowlevel.Abort:
                self._writers.remove(writer)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        self._messages.append(message)
        if self._reader is not None:
            trio.lowlevel.reschedule(self._reader)
            self._reader = None

    def holds_the_end(self) -> bool:
        """True when the request's last message (its body's end, or the disconnect) is queued:
        reading up to it will not wait."""
        return any(
            not message.get("more_body", False) or message["type"] == "http.disconnect"
            for message in self._messages
        )

    def on_disconnect(self, callback: Callable[[], None] | None) -> None:
        """Run `callback` when the client leaves (now, if it has); None removes it."""
        self._on_disconnect = callback
        if self.group is not None:
            if callback is None:
                self.group.listening.discard(self)
            else:
                self.group.listening.add(self)
        if callback is not None and self.disconnected:
            callback()

    def hang_up(self) -> None:
        """The client has closed the connection: as its disconnect message, without it."""
        if not self.disconnected and self._on_disconnect is not None:
            self._on_disconnect()
            self.disconnected = True  # after it: a callback that raised runs again on the message


class InboxTaskGroup(TaskGroup):
    """Hypercorn's task group of one connection, giving each request an `Inbox` (which can
    ask the connection to join a response's head to its body: `join_next_write`); `hang_up`
    tells those whose request listens for its client leaving that it has."""

    def __init__(
        self,
        hangups: HangupWatch | None = None,
        join_next_write: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.hangups = hangups  # the worker's, which watches this connection
        self.listening: set[Inbox] = set()  # inboxes with a disconnect callback
        self._join_next_write = join_next_write

    def hang_up(self) -> None:
        for inbox in list(self.listening):  # a callback may end its request's listening
            inbox.hang_up()

    async def spawn_app(
        self,
        app: AppWrapper,
        config: Config,
        scope: Any,
        send: Callable[[Any], Awaitable[None]],
    ) -> Callable[[Any], Awaitable[None]]:
        inbox = Inbox(config.max_app_queue_size, self, self._join_next_write)
        assert self._nursery is not None
        self._nursery.start_soon(
            _handle,
            app,
            config,
            scope,
            cast("ASGIReceiveCallable", inbox),  # Hypercorn types its messages; ours are dicts
            send,
            trio.to_thread.run_sync,
            trio.from_thread.run,
        )
        return inbox.put
