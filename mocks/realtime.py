"""The mock backend's WebSocket endpoint: a small Realtime-API-style server at /v1/realtime.

A session opens with a `session.created` event naming its `?model=`. Each text message is
answered, `ttft` later, by `tokens` `response.text.delta` events `token_delay` apart and a
`response.text.done` that carries the input verbatim (so a client can check it arrived byte
for byte); each binary message is echoed. Messages are answered one at a time, in order.

Handshake headers steer a session, like `x-mock-*` on HTTP:
- `x-mock-status: 503` refuses the handshake with that status (an HTTP answer, no session);
- `x-mock-close: 4001` (and `x-mock-close-reason`) closes right after `session.created`;
- `x-mock-stall: 1` accepts, then never sends anything (what it is sent is read and dropped).
`refuse_with` makes one backend refuse every handshake (a test sets it).
A backend that vanishes without a close frame is a killed mock process (`python -m mocks.llm`):
an ASGI app cannot drop its TCP connection.

Invariants: `active` counts sessions accepted and not yet ended, whatever way they end; every
close the client (the gateway) sent is in `closes`, with its code and reason.
"""

import json
from collections import deque
from typing import Any, TypedDict
from urllib.parse import parse_qsl

import trio

from .options import MockOptions

PATH = "/v1/realtime"
MAX_CLOSES = 1000


class Closed(TypedDict):
    code: int
    reason: str


class RealtimeStats(TypedDict):
    sessions: int
    active: int
    refused: int
    closes: list[Closed]
    last_headers: dict[str, str]


class Realtime:
    """The /v1/realtime sessions of one mock backend, and their counters."""

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.sessions = 0
        self.active = 0
        self.refused = 0
        self.closes: deque[Closed] = deque(maxlen=MAX_CLOSES)
        self.last_headers: dict[str, str] = {}
        # Tests make one backend refuse every handshake with this status (0: accept).
        self.refuse_with = 0

    def stats(self) -> RealtimeStats:
        return {
            "sessions": self.sessions,
            "active": self.active,
            "refused": self.refused,
            "closes": list(self.closes),
            "last_headers": dict(self.last_headers),
        }

    async def serve(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """One ASGI websocket connection."""
        if (await receive())["type"] != "websocket.connect":
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        self.last_headers = headers
        status = int(headers.get("x-mock-status", "0") or 0) or self.refuse_with
        if scope["path"] != PATH or status:
            self.refused += 1
            await _refuse(send, status or 404, f"no websocket at {scope['path']}")
            return
        offered = scope.get("subprotocols") or []
        await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
        self.sessions += 1
        self.active += 1
        try:
            await self._session(scope, receive, send, headers)
        finally:
            self.active -= 1

    async def _session(
        self, scope: dict[str, Any], receive: Any, send: Any, headers: dict[str, str]
    ) -> None:
        model = _query_value(scope["query_string"], "model")
        await _send_json(send, {"type": "session.created", "session": {"model": model}})
        if "x-mock-close" in headers:
            code = int(headers["x-mock-close"])
            await send(
                {
                    "type": "websocket.close",
                    "code": code,
                    "reason": headers.get("x-mock-close-reason", ""),
                }
            )
            return
        stall = headers.get("x-mock-stall", "0") not in ("0", "false")
        inbox_send, inbox = trio.open_memory_channel[dict[str, Any]](1)
        async with trio.open_nursery() as nursery:
            if not stall:
                nursery.start_soon(self._answer, inbox, send)
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    self.closes.append(
                        {"code": message.get("code", 1005), "reason": message.get("reason") or ""}
                    )
                    nursery.cancel_scope.cancel()
                    return
                if not stall:
                    await inbox_send.send(message)

    async def _answer(self, inbox: trio.MemoryReceiveChannel[dict[str, Any]], send: Any) -> None:
        options = self.options
        async for message in inbox:
            if message.get("bytes") is not None:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
                continue
            text = message.get("text") or ""
            await trio.sleep(options.ttft)
            deltas = [f"tok{index} " for index in range(options.tokens)]
            for index, delta in enumerate(deltas):
                if index:
                    await trio.sleep(options.token_delay)
                await _send_json(send, {"type": "response.text.delta", "delta": delta})
            done = {"type": "response.text.done", "text": "".join(deltas), "input": text}
            await _send_json(send, done)


async def _send_json(send: Any, event: dict[str, Any]) -> None:
    await send({"type": "websocket.send", "text": json.dumps(event)})


async def _refuse(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


def _query_value(query: bytes, name: str) -> str | None:
    for key, value in parse_qsl(query.decode("latin-1")):
        if key == name:
            return value
    return None
