"""Two things Hypercorn's WebSocket stream does not tell an ASGI app, made visible.

1. The close code: Hypercorn 0.18 answers a client's close frame itself, then reports
   `websocket.disconnect` with 1006 whatever the client sent (hypercorn #127), so a proxy could
   not tell a clean close from a vanished client, nor pass the code on. The stream below
   remembers the first close frame to cross the connection without the app asking for it (the
   client's, or Hypercorn's own 1009 for a message over `websocket_max_message_size`) and
   reports its code and reason. A connection that ends without a close frame is still 1006.
2. The client's pings: Hypercorn answers them itself and the app never hears of them, so an
   idle timeout could not see that a listening client is alive. Each answered ping is noted on
   the `ClientPings` found in `scope["extensions"]["ntonix.client_pings"]`.

`install()` swaps this stream in for Hypercorn's in its HTTP/1.1 and HTTP/2 protocols, which
look the class up at each upgrade. Invariant: at most one `websocket.disconnect` reaches the app
per connection, as before. Hypercorn internals: pyproject.toml pins hypercorn < 0.19, and
tests/test_websocket.py covers both behaviours.
"""

from __future__ import annotations

from typing import Any

import hypercorn.protocol.h2
import hypercorn.protocol.h11
import trio
from hypercorn.protocol.events import Request, StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.events import CloseConnection, Pong

PINGS_EXTENSION = "ntonix.client_pings"


class ClientPings:
    """When the client last pinged (on Trio's clock); None: not yet."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: float | None = None


class _ReportingWSStream(WSStream):
    _close_seen: tuple[int, str] | None = None
    _pings: ClientPings | None = None

    async def _send_wsproto_event(self, event: Any) -> None:
        if isinstance(event, Pong) and self._pings is not None:
            self._pings.last = trio.current_time()
        # The app's own close moves the state to CLOSED before it gets here: what is left is
        # the echo of the client's close frame, or Hypercorn closing on its own account.
        elif (
            isinstance(event, CloseConnection)
            and self.state == ASGIWebsocketState.CONNECTED
            and self._close_seen is None
        ):
            self._close_seen = (int(event.code), event.reason or "")
        await super()._send_wsproto_event(event)

    async def handle(self, event: Any) -> None:
        if isinstance(event, Request):
            self._pings = ClientPings()
            await super().handle(event)
            # The scope was built above; the app reads the extension only once it has
            # accepted, long after this.
            if not self.closed:
                self.scope["extensions"][PINGS_EXTENSION] = self._pings  # type: ignore[assignment]
            return
        seen = self._close_seen
        if (
            isinstance(event, StreamClosed)
            and seen is not None
            and not self.closed
            and self.app_put is not None
            and self.state == ASGIWebsocketState.CONNECTED
        ):
            self.closed = True
            await self.app_put({"type": "websocket.disconnect", "code": seen[0], "reason": seen[1]})
            return
        await super().handle(event)


def install() -> None:
    """Idempotent; affects every Hypercorn server in this process (the mocks' too)."""
    for protocol in (hypercorn.protocol.h11, hypercorn.protocol.h2):
        setattr(protocol, "WSStream", _ReportingWSStream)  # noqa: B010 (not re-exported)
