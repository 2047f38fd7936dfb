"""The client side of a request: its body, its disconnect, and the response towards it.

Invariants: after commit an error never ends the body cleanly: SSE and NDJSON streams get an
error frame at a frame boundary, any other body is left unfinished so Hypercorn aborts it. A
client that leaves cancels its request, also while the last send of the response waits for it
(after `LAST_SEND_GRACE`, give or take the worker's timer tick under `ntonix serve`).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType

import trio

from ntonix.asgi import Receive, Send, send_body
from ntonix.core.framing import StreamKind, stream_error_frame, stream_kind
from ntonix.core.telemetry import RequestRecord
from ntonix.errors import GatewayError, client_error, dialect_of
from ntonix.inbox import BODY_OVER_LIMIT, Inbox
from ntonix.watchdog import IdleWatch, Silence


class ClientGone(Exception):
    """The client disconnected before the gateway answered: nobody waits for a response."""


# nginx's status for a client that left before its response began; no client ever sees it.
CLIENT_CLOSED_REQUEST = 499

# How long a last send may go on after a disconnect was reported from inside it (Hypercorn's
# notice that the response ended comes that way, and the send returns right after it). One
# still waiting then is waiting for a client that is gone: over HTTP/2 under the plain
# `hypercorn` command, a send waiting for window never returns once the connection has closed.
LAST_SEND_GRACE = 1.0


class Downstream:
    """The response towards the client: committed once, then body chunks, then one end.

    It notes on the request's record what the client got: status, first byte, bytes, chunks.
    """

    __slots__ = (
        "_send",
        "check_hangups",
        "committed",
        "delivered",
        "dialect",
        "finished",
        "join_head",
        "kind",
        "on_gone",
        "record",
        "request_id",
        "tail",
    )

    def __init__(self, send: Send, record: RequestRecord) -> None:
        self._send = send
        self.record = record
        self.request_id = record.request_id
        self.dialect = dialect_of(record.path)  # the shape of its errors: OpenAI's or Ollama's
        self.committed = False
        self.finished = False  # the last send has begun
        self.delivered = trio.Event()  # the last send has returned
        self.kind = StreamKind.OTHER
        self.tail = b""
        # Closes the upstream connection the request holds, if any: run as the client leaves,
        # so the backend sees the close before the cancelled request has unwound.
        self.on_gone: Callable[[], None] | None = None
        # Under `ntonix serve`: the head's write waits to go out with the body's first bytes
        # (one send, not two), for a body that follows it at once (`Inbox.join_next_write`).
        self.join_head: Callable[[], None] | None = None
        # The worker's hang-up watch, asked before each write (`hangups.py`): a batch of writes
        # under load lasts long enough for clients to leave in the middle of it.
        self.check_hangups: Callable[[], None] | None = None

    async def start(
        self, status: int, headers: list[tuple[bytes, bytes]], *, body_follows: bool = False
    ) -> None:
        """Commit: status and headers, plus the gateway's own for this request.

        `body_follows`: the caller writes the body's first bytes right after, without waiting
        for anything, so the head may go out with them."""
        record = self.record
        record.status = status
        record.phase = "stream"
        for name, value in headers:
            if name == b"x-ntonix-backend":  # also on a response shared with a coalesced flight
                record.backend = value.decode("latin-1")
        self.kind = stream_kind(headers)
        headers += self._own_headers()
        if self.kind is StreamKind.SSE:
            # An nginx in front must not buffer the stream either.
            headers.append((b"x-accel-buffering", b"no"))
        self.committed = True
        if body_follows and self.join_head is not None:
            self.join_head()
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes, *, more: bool) -> None:
        if self.check_hangups is not None:
            self.check_hangups()  # this request's own client may be among those gone
        # A request cancelled since its data was read (its client has left) writes nothing:
        # Hypercorn's send is shielded, so the chunk would go to a dead client, ahead of the
        # work the cancellation is waiting behind.
        await trio.lowlevel.checkpoint_if_cancelled()
        if data:
            self.tail = data[-4:]
            self.record.note_body(len(data), trio.current_time)
        # Set before the send: Hypercorn reports the end of a response as a disconnect from
        # inside this very send, and that one must not cancel Hypercorn's own bookkeeping.
        self.finished = not more
        await self._send({"type": "http.response.body", "body": data, "more_body": more})
        if not more:
            self.delivered.set()

    async def fail(self, error: GatewayError) -> None:
        """Tell the client: a JSON error before commit, an error frame after it."""
        record = self.record
        record.error = error.code
        if not self.committed:
            self.committed = True
            self.finished = True  # as in `write`: the end of this send is no disconnect
            record.status = error.status
            record.outcome = "error"
            body = error.body(self.dialect)
            record.note_body(len(body), trio.current_time)
            if self.join_head is not None:
                self.join_head()
            await send_body(self._send, error.status, body, error.headers() + self._own_headers())
            self.delivered.set()
            return
        record.outcome = "stream_error"
        frame = stream_error_frame(self.kind, self.tail, error.payload(self.dialect))
        if frame is not None:
            await self.write(frame, more=False)
        # Else return without ending the body: Hypercorn then closes the connection mid-body,
        # which every HTTP client reports as an error.

    def _own_headers(self) -> list[tuple[bytes, bytes]]:
        """x-request-id, and while the cache is on, what it did for this request."""
        headers = [(b"x-request-id", self.request_id)]
        if self.record.cache != "off":
            headers.append((b"x-ntonix-cache", self.record.cache.encode()))
        return headers + self.record.extra_headers


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, refusing it as soon as it grows past `limit`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        if BODY_OVER_LIMIT in message:
            raise too_large(limit)
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def cancelled_on_disconnect(
    receive: Receive, downstream: Downstream, timers: IdleWatch
) -> AbstractAsyncContextManager[None]:
    """The body runs in a cancel scope that the client's leaving cancels.

    With an `Inbox` (`ntonix serve`), Hypercorn's disconnect message cancels it from a
    callback: no task (`_InboxWatch`); a last send under way gets `LAST_SEND_GRACE` from the
    worker's `timers`. Otherwise a watcher task blocked in `receive()` does
    (`cancel_on_disconnect`).
    """
    if isinstance(receive, Inbox):
        return _InboxWatch(receive, downstream, timers)
    return _watched(receive, downstream)


class _InboxWatch:
    """`cancelled_on_disconnect` for an `Inbox`: a class, not a generator-based context
    manager, because every request enters one (no generator, no closure per request)."""

    __slots__ = ("_downstream", "_grace", "_inbox", "_scope", "_timers")

    def __init__(self, inbox: Inbox, downstream: Downstream, timers: IdleWatch) -> None:
        self._inbox = inbox
        self._downstream = downstream
        self._timers = timers
        self._scope = trio.CancelScope()
        self._grace: Silence | None = None

    async def __aenter__(self) -> None:
        self._scope.__enter__()
        self._inbox.on_disconnect(self._client_gone)
        group = self._inbox.group
        if group is not None and group.hangups is not None:
            self._downstream.check_hangups = group.hangups.check

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if self._downstream.check_hangups is not None:
            # Clients that leave together are unwound together, in a batch with no writes.
            self._downstream.check_hangups()
        self._inbox.on_disconnect(None)
        if self._grace is not None:
            self._timers.forget(self._grace)
        handled = self._scope.__exit__(kind, error, traceback)
        downstream = self._downstream
        if (
            self._scope.cancelled_caught
            and self._grace is not None
            and not downstream.delivered.is_set()
        ):
            client_left(downstream.record, committed=downstream.committed)
        return handled

    def _client_gone(self) -> None:
        downstream = self._downstream
        if not downstream.finished:
            if downstream.on_gone is not None:
                downstream.on_gone()  # the backend first: it may be one of many found together
            group = self._inbox.group
            if group is not None and group.hangups is not None:
                group.hangups.after_closes(self._cancel)
            else:
                self._cancel()
        elif not downstream.delivered.is_set() and self._grace is None:
            # Hypercorn's notice that the response ended comes this way too, from inside
            # the last send, which returns right after it.
            self._grace = self._timers.watch(self._scope)
            self._grace.expires = trio.current_time() + LAST_SEND_GRACE

    def _cancel(self) -> None:
        downstream = self._downstream
        client_left(downstream.record, committed=downstream.committed)
        self._scope.cancel()


@asynccontextmanager
async def _watched(receive: Receive, downstream: Downstream) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_on_disconnect, receive, downstream, nursery.cancel_scope)
        yield
        nursery.cancel_scope.cancel()


async def cancel_on_disconnect(
    receive: Receive, downstream: Downstream, scope: trio.CancelScope
) -> None:
    """Watch for the client leaving; then cancel its request so the upstream closes at once.

    Hypercorn reports a disconnect only to a task blocked in receive(), never through send().
    """
    while (await receive())["type"] != "http.disconnect":
        pass
    if downstream.finished:
        with trio.move_on_after(LAST_SEND_GRACE):
            await downstream.delivered.wait()
        if downstream.delivered.is_set():
            return  # the response ended (or the client left just as it did)
    client_left(downstream.record, committed=downstream.committed)
    scope.cancel()
    if downstream.on_gone is not None:
        downstream.on_gone()


def client_left(record: RequestRecord, *, committed: bool) -> None:
    record.disconnected = True
    record.outcome = "client_disconnected"
    if not committed:
        record.status = CLIENT_CLOSED_REQUEST


def new_request_id() -> bytes:
    """24 hex digits (96 random bits), unique in practice, but not a secret: a client may send
    its own x-request-id, and nothing trusts one. So Python's generator (seeded by the OS in
    each worker process, and again after a fork) instead of a system call per request."""
    return b"%024x" % random.getrandbits(96)


def too_large(limit: int) -> GatewayError:
    return client_error(413, "request_too_large", f"The request body is larger than {limit} bytes")
