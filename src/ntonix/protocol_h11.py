"""Hypercorn's HTTP/1.1 protocol in `ntonix serve`, with the limits it lacks (`protocols.py`
builds it for every connection that does not speak HTTP/2).

Hypercorn 0.18's `H11Protocol` closes the connection in the middle of a response when bytes
arrive after a request it must close on, waits out the body timeout for a chunk that announces
more than any body may hold, joins an obs-fold header line to the field before it, and closes
the connection whenever a response ends before its request's body was read (an early refusal:
401, 404, 429), so a client that sends its next request on that connection finds it closed.

Invariants:
- A response the connection must close after is always sent whole.
- A chunk size over `max_request_body` stops the body's reading and the app answers 413 at
  once (the message `inbox.BODY_OVER_LIMIT`); the connection closes after it.
- A head with an obs-fold line gets 400; the connection closes.
- A response that ends before its request's body was read keeps the connection when the rest
  of the body is at most `UNREAD_BODY_LIMIT` bytes (a `Content-Length` that says so, or a
  chunked body that stays under it): the rest is read and dropped, as nginx does, then the next
  request is read. It must arrive within Hypercorn's keep-alive timeout, else the connection
  closes. A longer body closes the connection, without reading it.

These reach into Hypercorn's and h11's internals (pinned in pyproject.toml): `_handle_events`
(which hands the body to `self.stream`), `_maybe_recycle`, `_close_stream` and h11's body
readers.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Awaitable, Callable
from typing import cast

import h11
import h11._readers
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, EndBody, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.typing import (
    AppWrapper,
    ConnectionState,
    HTTPRequestEvent,
    TaskGroup,
    WorkerContext,
)

from ntonix.inbox import BODY_OVER_LIMIT

# The most of an unread request body read (and dropped) to keep its connection after an early
# response: a chat request of a few dozen KiB costs less to read than the client's reconnect
# (a TCP, perhaps TLS, handshake); a body of megabytes does not.
UNREAD_BODY_LIMIT = 64 * 1024


class GuardedH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 connection, sending a closing response whole, refusing a chunk
    larger than any body may be before it arrives, and keeping the connection after an early
    response by dropping the small body it did not read."""

    def __init__(
        self,
        max_request_body: int,
        app: AppWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        task_group: TaskGroup,
        state: ConnectionState,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Callable[[Event], Awaitable[None]],
    ) -> None:
        # Not `self`: a function held by the protocol that refers to it makes a reference
        # cycle, and the connection's objects were then freed only by the garbage collector.
        protocol = weakref.ref(self)

        async def send_or_finish_first(event: Event) -> None:
            # Hypercorn closes at once when the client sends what cannot be read (bytes after a
            # request the response closes on), cutting a response the app is still writing:
            # the client got its head and no body. It closes again once the app has ended.
            # (A body the app left unfinished is still cut, on purpose: then it has ended.)
            if (
                isinstance(event, Closed)
                and (me := protocol()) is not None
                and me.stream is not None
                and me.connection.our_state is h11.SEND_BODY
            ):
                return
            await send(event)

        super().__init__(
            app, config, context, task_group, state, ssl, client, server, send_or_finish_first
        )
        self.connection = _RefusingObsFold(
            h11.SERVER, max_incomplete_event_size=config.h11_max_incomplete_size
        )
        self.max_request_body = max_request_body
        self._body_refused = False

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed) and self._unread_body_is_small():
            # The response ended before its request's body was read. Hypercorn would close;
            # the rest of the body goes to a sink instead, through Hypercorn's own reading loop
            # (which hands body events to `self.stream`), and the sink starts the next cycle
            # once the body has ended. Meanwhile the connection counts as idle: the keep-alive
            # timer bounds the wait for the body.
            await self._close_stream()
            self.stream = cast(HTTPStream, _UnreadBody(self))
            await self.send(Updated(idle=True))
            return
        await super().stream_send(event)

    def _unread_body_is_small(self) -> bool:
        connection = self.connection
        if (
            not isinstance(connection, h11.Connection)  # a WebSocket
            or self._body_refused
            or self.context.terminated.is_set()
            or connection.our_state is not h11.DONE
            or connection.their_state is not h11.SEND_BODY
        ):
            return False
        reader = connection._reader
        if isinstance(reader, h11._readers.ContentLengthReader):
            return reader._remaining <= UNREAD_BODY_LIMIT
        return isinstance(reader, h11._readers.ChunkedReader)  # counted as it comes

    async def refuse_unread_body(self) -> None:
        """The dropped body grew past the limit: the connection closes, the rest unread."""
        if not self._body_refused:
            self._body_refused = True
            await self.send(Closed())

    async def unread_body_ended(self) -> None:
        """The dropped body has ended: the connection serves its next request, as after any
        request whose body was read (`_maybe_recycle` closes it if that cannot be)."""
        if not self._body_refused:
            await self._maybe_recycle()

    async def handle(self, event: Event) -> None:
        if (
            isinstance(event, RawData)
            and event.data
            and (self._body_refused or self.connection.their_state in (h11.MUST_CLOSE, h11.ERROR))
        ):
            # Nothing the client sends now is read: h11 would only hold it.
            return
        await super().handle(event)
        if isinstance(event, RawData) and not self._body_refused and self._chunk_over_limit():
            # Nothing more of this body is read: no body under the limit can follow. The app
            # answers 413 (in its client's dialect, with its access-log line) as for a body
            # that grew past the limit; the connection closes after it, its body unread.
            self._body_refused = True
            if isinstance(self.stream, HTTPStream) and self.stream.app_put is not None:
                message = {"type": "http.request", "body": b"", "more_body": True}
                await self.stream.app_put(
                    cast("HTTPRequestEvent", {**message, BODY_OVER_LIMIT: True})
                )
            else:
                await self.send(Closed())

    def _chunk_over_limit(self) -> bool:
        if not isinstance(self.connection, h11.Connection):
            return False  # a WebSocket upgrade
        reader = self.connection._reader
        return (
            isinstance(reader, h11._readers.ChunkedReader)
            and reader._bytes_in_chunk > self.max_request_body
        )


class _UnreadBody:
    """Where the rest of a body goes once its response has ended: Hypercorn's reading loop
    hands it the body's events as it would the request's stream."""

    def __init__(self, protocol: GuardedH11Protocol) -> None:
        self._protocol = protocol
        self._dropped = 0

    async def handle(self, event: StreamEvent) -> None:
        if isinstance(event, Body):
            self._dropped += len(event.data)
            if self._dropped > UNREAD_BODY_LIMIT:  # a chunked body, grown past it
                await self._protocol.refuse_unread_body()
        elif isinstance(event, EndBody):
            await self._protocol.unread_body_ended()
        # StreamClosed: nothing of ours is open.


class _RefusingObsFold(h11.Connection):
    """h11's server connection, answering a request head with an obs-fold line (a header line
    that starts with a space or tab) 400 where h11 would join it to the field before: RFC 9112
    section 5.2 allows either, and a fold that some server behind a proxy reads differently is
    a smuggling vector."""

    def _extract_next_receive_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        if self.their_state is h11.IDLE and _folded(bytes(self._receive_buffer)):
            # Raised inside h11's own handling: the peer's state becomes ERROR, and Hypercorn
            # answers with the hint and closes, as for any malformed head.
            raise h11.RemoteProtocolError(
                "obs-fold line in the request head", error_status_hint=400
            )
        return super()._extract_next_receive_event()


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_FOLD = re.compile(rb"\n[ \t]")


def _folded(received: bytes) -> bool:
    """Whether the head at the start of `received`, once whole, has an obs-fold line."""
    end = _HEAD_END.search(received)
    return end is not None and _FOLD.search(received, 0, end.start()) is not None
