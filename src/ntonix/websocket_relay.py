"""The relay of one accepted WebSocket session: two pumps and the watchers that may end it.

Invariants: each direction is one task, so messages keep their order; a pump awaits the write
before it reads the next message, so a side that stops reading stalls the other instead of
filling a buffer; the first `Ending` recorded wins and cancels the relay's nursery; every
`ConnectionClosed` is caught in the pump that sees it (one escaping into the nursery would
become an ExceptionGroup and a 1011).
"""

from __future__ import annotations

import math

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ntonix.asgi import Receive, Scope, Send
from ntonix.core.sessions import SessionCounts
from ntonix.core.telemetry import RequestRecord
from ntonix.core.websocket import (
    SHUTDOWN,
    Ending,
    backend_closed,
    client_closed,
    idle_ending,
    too_big,
)
from ntonix.hypercorn_ws import PINGS_EXTENSION, ClientPings

CLOSE_TIMEOUT = 1.0  # seconds the backend gets to answer our close frame
# Sessions are closed this long before graceful_timeout runs out, so that the close frames go
# out before the server cancels the connections.
SHUTDOWN_MARGIN = 0.5


class Relay:
    """The two pumps of one accepted session and the watchers that may end it."""

    def __init__(
        self,
        record: RequestRecord,
        counts: SessionCounts,
        max_message_size: int,
        idle_timeout: float,
        pings: ClientPings,
    ) -> None:
        self.record = record
        self.counts = counts
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.pings = pings
        # When each side last showed it is there: a message, a ping (client), a pong (backend).
        self.client_seen = self.backend_seen = trio.current_time()
        self.ending: Ending | None = None
        self.nursery: trio.Nursery | None = None

    def end(self, ending: Ending) -> None:
        """The first ending wins; the relay's tasks are cancelled."""
        if self.ending is None:
            self.ending = ending
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    async def client_to_backend(self, receive: Receive, upstream: WebSocketConnection) -> None:
        record, counts = self.record, self.counts
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.end(client_closed(message.get("code", 1005), message.get("reason") or ""))
                return
            data: str | bytes | None = message.get("bytes")
            if data is None:
                data = message.get("text") or ""
            size = _size(data)
            if size > self.max_message_size:
                self.end(too_big(self.max_message_size))
                return
            try:
                await upstream.send_message(data)
            except ConnectionClosed as closed:
                self.end(backend_ending(closed))
                return
            counts.messages_in += 1
            record.bytes_in += size
            self.client_seen = trio.current_time()

    async def backend_to_client(self, upstream: WebSocketConnection, send: Send) -> None:
        record, counts = self.record, self.counts
        while True:
            try:
                data = await upstream.get_message()
            except ConnectionClosed as closed:
                self.end(backend_ending(closed))
                return
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
            counts.messages_out += 1
            record.bytes_out += _size(data)
            self.backend_seen = trio.current_time()

    async def watch_idle(self) -> None:
        """A side silent for `idle_timeout` (no message, and no ping from the client or pong
        from the backend) is taken for gone: the session is closed."""
        while True:
            client = max(self.client_seen, self.pings.last or -math.inf)
            quiet = "client" if client <= self.backend_seen else "backend"
            deadline = min(client, self.backend_seen) + self.idle_timeout
            if trio.current_time() >= deadline:
                self.end(idle_ending(quiet, self.idle_timeout))
                return
            await trio.sleep_until(deadline)

    async def ping(self, upstream: WebSocketConnection, interval: float) -> None:
        """Ping the backend every `interval`; its pong shows it is there. A backend that stops
        answering is left to the idle watchdog."""
        while True:
            await trio.sleep(interval)
            try:
                await upstream.ping()
            except ConnectionClosed:
                return  # the backend pump reports it
            self.backend_seen = trio.current_time()

    async def close_on_shutdown(self, stopping: trio.Event, graceful_timeout: float) -> None:
        await stopping.wait()
        await trio.sleep(max(0.0, graceful_timeout - SHUTDOWN_MARGIN))
        self.end(SHUTDOWN)


def scope_pings(scope: Scope) -> ClientPings:
    """The client's pings as Hypercorn (with `hypercorn_ws` installed) notes them; under
    another server they are unseen, and only messages show the client is there."""
    pings = scope.get("extensions", {}).get(PINGS_EXTENSION)
    return pings if isinstance(pings, ClientPings) else ClientPings()


def backend_ending(closed: ConnectionClosed) -> Ending:
    reason = closed.reason
    if reason is None:
        return backend_closed(1006, "")
    return backend_closed(reason.code, reason.reason or "")


def _size(data: str | bytes) -> int:
    if isinstance(data, str) and not data.isascii():
        return len(data.encode())
    return len(data)


async def close_session(
    ending: Ending, send: Send, upstream: WebSocketConnection, counts: SessionCounts
) -> None:
    """Phase close: each side still there gets the close the ending names."""
    counts.closed_by = ending.closer.value
    if ending.to_client is None:
        counts.client_code = ending.code
    else:
        counts.client_code = ending.to_client.code
        message = {
            "type": "websocket.close",
            "code": ending.to_client.code,
            "reason": ending.to_client.reason,
        }
        await send(message)
    if ending.to_backend is None:
        counts.backend_code = ending.code
    else:
        counts.backend_code = ending.to_backend.code
        with trio.move_on_after(CLOSE_TIMEOUT):
            await upstream.aclose(ending.to_backend.code, ending.to_backend.reason or None)
