"""Hypercorn's protocols in `ntonix serve`, with the limits they lack.

Hypercorn 0.18's `H2Protocol` (what the plain `hypercorn` command runs) queues a stream's
response data without bound while the client's flow-control window is shut, lets a send wait
for window for ever (even after the connection is gone), and closes a connection for stream
resets only after its 1,000-request limit. The worker (`worker.py`) builds `GuardedProtocol`
for every connection, which speaks `GuardedH2Protocol` (TLS with ALPN h2, or cleartext HTTP/2)
or `GuardedH11Protocol` (`protocol_h11.py`: HTTP/1.1's gaps).

Invariants:
- A stream's unsent response data stays under `STREAM_BUFFER_LIMIT` plus the one chunk being
  sent: the app's `send` blocks until the client's window opens, so the gateway stops reading
  from the backend (back-pressure).
- A send that waits for window longer than the send timeout resets the stream (RST_STREAM
  CANCEL): the app sees a disconnect and the request is cancelled.
- When the connection ends, every send waiting on it returns at once.
- A client that resets more than `RESET_BUDGET` streams in `RESET_WINDOW` seconds, on one
  connection or from one address (over this worker's connections), gets GOAWAY
  ENHANCE_YOUR_CALM and its connection is closed; while its address is over budget, a new
  connection or stream from it gets the same before any request starts.
- A header block (HEADERS and its CONTINUATION frames) over `MAX_HEADER_BLOCK` bytes closes
  the connection with ENHANCE_YOUR_CALM, so at most that much is held per connection.

These reach into Hypercorn's and h2's internals (pinned in pyproject.toml):
`stream_buffers`, `_send_data`, `_handle_events`, `_flush`, `_close_stream` and h2's
`FrameBuffer`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, Data, EndBody, EndData, Trailers
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError
from hypercorn.typing import (
    AppWrapper,
    ConnectionState,
    TaskGroup,
    WorkerContext,
)
from hyperframe.frame import Frame

from ntonix.core.budgets import ResetBudget
from ntonix.protocol_h11 import GuardedH11Protocol

log = logging.getLogger("ntonix.h2")

# Response bytes queued per stream before the app's send waits for the client's window: four
# default-sized frames, enough to keep a reading client's window full.
STREAM_BUFFER_LIMIT = 64 * 1024
# Stream resets a client may send per window, per connection and per address (nginx and Go's
# HTTP/2 servers cap them likewise since CVE-2023-44487). A user stopping a stream now and then
# is far below this; each reset still cost the backend a prefill.
RESET_BUDGET = 100
RESET_WINDOW = 10.0
# Largest header block (compressed, across CONTINUATION frames) held while it arrives; the
# decoded header list is capped at Hypercorn's h2_max_header_list_size (64 KiB) too.
MAX_HEADER_BLOCK = 64 * 1024

# The events of a response that may wait for the client's window.
_WINDOWED = (Body, Data, EndBody, EndData, Trailers)


@attrs.frozen
class Guard:
    """What every connection of one worker shares: the send timeout, the largest request body
    and the HTTP/2 reset budgets of client addresses."""

    send_timeout: float
    max_request_body: int
    address_resets: ResetBudget = attrs.field(
        factory=lambda: ResetBudget(RESET_BUDGET, RESET_WINDOW)
    )


class GuardedProtocol(ProtocolWrapper):
    """Hypercorn's choice of protocol for a connection: `GuardedH2Protocol` for HTTP/2 (ALPN h2,
    or cleartext HTTP/2 found while parsing HTTP/1.1), `GuardedH11Protocol` otherwise."""

    def __init__(
        self,
        guard: Guard,
        app: AppWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        task_group: TaskGroup,
        state: ConnectionState,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Callable[[Event], Awaitable[None]],
        alpn_protocol: str | None = None,
    ) -> None:
        # Hypercorn's constructor makes an unguarded protocol, replaced at once.
        super().__init__(app, config, context, task_group, state, ssl, client, server, send)
        self.guard = guard
        self.protocol = self._http2() if alpn_protocol == "h2" else self._http1()

    def _http1(self) -> GuardedH11Protocol:
        return GuardedH11Protocol(
            self.guard.max_request_body,
            self.app,
            self.config,
            self.context,
            self.task_group,
            self.state,
            self.ssl,
            self.client,
            self.server,
            self.send,
        )

    def _http2(self) -> GuardedH2Protocol:
        return GuardedH2Protocol(
            self.guard,
            self.app,
            self.config,
            self.context,
            self.task_group,
            self.state,
            self.ssl,
            self.client,
            self.server,
            self.send,
        )

    async def handle(self, event: Event) -> None:
        # A cleartext connection turns to HTTP/2 when HTTP/1.1 parsing finds the HTTP/2
        # preface or an h2c upgrade.
        try:
            await self.protocol.handle(event)
        except H2ProtocolAssumedError as assumed:
            self.protocol = self._http2()
            await self.protocol.initiate()
            if assumed.data:
                await self.protocol.handle(RawData(data=assumed.data))
        except H2CProtocolRequiredError as upgrade:
            self.protocol = self._http2()
            await self.protocol.initiate(upgrade.headers, upgrade.settings)
            if upgrade.data:
                await self.protocol.handle(RawData(data=upgrade.data))


class GuardedH2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 connection with bounded stream buffers, a send timeout and a reset
    budget (see the module's invariants)."""

    def __init__(
        self,
        guard: Guard,
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
        super().__init__(app, config, context, task_group, state, ssl, client, server, send)
        self.guard = guard
        self.address = client[0] if client else ""
        self.resets = ResetBudget(RESET_BUDGET, RESET_WINDOW, max_keys=1)
        self.connection.incoming_buffer = _CappedFrameBuffer(server=True)
        # Set (and replaced) whenever queued data leaves a stream's buffer or a buffer closes:
        # sends waiting for room look again.
        self._progress = trio.Event()

    async def initiate(
        self, headers: list[tuple[bytes, bytes]] | None = None, settings: bytes | None = None
    ) -> None:
        await super().initiate(headers, settings)
        if self.guard.address_resets.exhausted(self.address, trio.current_time()):
            await self._calm_down()

    async def handle(self, event: Event) -> None:
        if isinstance(event, Closed):
            # Hypercorn's sender stops with the connection: nothing would ever drain these.
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()
            self._note_progress()
        await super().handle(event)

    async def stream_send(self, event: StreamEvent) -> None:
        if not isinstance(event, _WINDOWED):
            await super().stream_send(event)
            return
        with trio.move_on_after(self.guard.send_timeout) as waiting:
            await super().stream_send(event)
            if isinstance(event, (Body, Data)):
                await self._room(event.stream_id)
        if waiting.cancelled_caught:
            await self._stalled(event.stream_id)

    async def _send_data(self, stream_id: int) -> None:
        await super()._send_data(stream_id)
        self._note_progress()

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        now = trio.current_time()
        calm = False
        for event in events:
            if isinstance(event, h2.events.StreamReset) and event.remote_reset:
                over_here = self.resets.spend("", now)
                over_there = self.guard.address_resets.spend(self.address, now)
                if (over_here or over_there) and not calm:
                    log.warning(
                        "HTTP/2 client %s reset more than %d streams in %g s: connection closed",
                        self.address,
                        RESET_BUDGET,
                        RESET_WINDOW,
                    )
                calm = calm or over_here or over_there
            elif isinstance(event, h2.events.RequestReceived):
                calm = calm or self.guard.address_resets.exhausted(self.address, now)
        if calm:
            # Not even the requests in this batch start: each would cost the backend a prefill.
            await self._calm_down()
            return
        await super()._handle_events(events)

    async def _room(self, stream_id: int) -> None:
        """Until the stream's queued data is under the limit (or the stream is gone)."""
        while (buffer := self.stream_buffers.get(stream_id)) is not None and len(
            buffer.buffer
        ) > STREAM_BUFFER_LIMIT:
            await self._progress.wait()

    async def _stalled(self, stream_id: int) -> None:
        """The client left a stream's window shut past the send timeout: reset it, and tell
        its app the client is gone."""
        try:
            self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:
            pass  # the stream or the connection has ended meanwhile
        else:
            await self._flush()
        if (buffer := self.stream_buffers.get(stream_id)) is not None:
            await buffer.close()
        self._note_progress()
        await self._close_stream(stream_id)
        # Hypercorn's sender then finds the stream reset and drops its buffer.
        await self._window_updated(stream_id)

    async def _calm_down(self) -> None:
        self.connection.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        await self._flush()
        await self.send(Closed())

    def _note_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()


class _CappedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, holding at most MAX_HEADER_BLOCK bytes of an unfinished header block
    (h2 alone allows 64 CONTINUATION frames of up to 16 KiB each, per connection)."""

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        frame = super()._update_header_buffer(f)
        held = sum(len(part.data) for part in self._headers_buffer)
        if held > MAX_HEADER_BLOCK:
            # h2 answers it with GOAWAY ENHANCE_YOUR_CALM; Hypercorn then closes the connection.
            raise h2.exceptions.DenialOfServiceError(f"header block over {MAX_HEADER_BLOCK} bytes")
        return frame
