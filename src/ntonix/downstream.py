"""The response towards one client, as an ASGI send: commit once, body pieces, one end.

Invariant: after commit an error never ends the body cleanly: SSE and NDJSON streams get an
error frame at a frame boundary, any other body is left unfinished so Hypercorn aborts it.
"""

from __future__ import annotations

from ntonix.asgi import Send, send_body
from ntonix.core.framing import StreamKind, stream_error_frame, stream_kind
from ntonix.errors import GatewayError


class Downstream:
    """The response towards the client: committed once, then body chunks, then one end."""

    __slots__ = ("_send", "cache_label", "committed", "finished", "kind", "request_id", "tail")

    def __init__(self, send: Send, request_id: bytes) -> None:
        self._send = send
        self.request_id = request_id
        self.cache_label = b""
        self.committed = False
        self.finished = False
        self.kind = StreamKind.OTHER
        self.tail = b""

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Commit: status and headers, plus the gateway's own for this request."""
        self.kind = stream_kind(headers)
        headers.append((b"x-request-id", self.request_id))
        if self.cache_label:
            headers.append((b"x-ntonix-cache", self.cache_label))
        if self.kind is StreamKind.SSE:
            # An nginx in front must not buffer the stream either.
            headers.append((b"x-accel-buffering", b"no"))
        self.committed = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes, *, more: bool) -> None:
        if data:
            self.tail = data[-4:]
        # Set before the send: Hypercorn reports the end of a response as a disconnect from
        # inside this very send, and that one must not cancel Hypercorn's own bookkeeping.
        self.finished = not more
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def fail(self, error: GatewayError) -> None:
        """Tell the client: a JSON error before commit, an error frame after it."""
        if not self.committed:
            self.committed = True
            headers = [*error.headers(), (b"x-request-id", self.request_id)]
            if self.cache_label:
                headers.append((b"x-ntonix-cache", self.cache_label))
            await send_body(self._send, error.status, error.body(), headers)
            return
        frame = stream_error_frame(self.kind, self.tail, error.payload())
        if frame is not None:
            await self.write(frame, more=False)
        # Else return without ending the body: Hypercorn then closes the connection mid-body,
        # which every HTTP client reports as an error.
