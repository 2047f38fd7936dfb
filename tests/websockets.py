"""Helpers for the WebSocket tests: a gateway config, URLs, and a client that can vanish."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import (
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from ntonix.config import AuthSettings, BackendSettings, Config, WebSocketSettings
from tests.support import gateway_config

MODEL = "mock-llm"


def ws_config(
    *backends: BackendSettings,
    websocket: WebSocketSettings | None = None,
    auth: AuthSettings | None = None,
    **gateway: Any,
) -> Config:
    config = gateway_config(*backends, **gateway)
    return attrs.evolve(
        config, websocket=websocket or WebSocketSettings(), auth=auth or AuthSettings()
    )


def ws_url(gateway: str, path: str = "/v1/realtime", model: str | None = MODEL) -> str:
    query = f"?model={model}" if model is not None else ""
    return gateway.replace("http://", "ws://", 1) + path + query


def event(message: str | bytes) -> dict[str, Any]:
    assert isinstance(message, str), message
    parsed: dict[str, Any] = json.loads(message)
    return parsed


async def answer_of(ws: WebSocketConnection) -> dict[str, Any]:
    """Read the mock's answer to one text message: its deltas, then its `done` event."""
    while (done := event(await ws.get_message()))["type"] != "response.text.done":
        assert done["type"] == "response.text.delta"
    return done


class VanishingClient:
    """A WebSocket client whose connection can be reset without a close frame."""

    def __init__(self, stream: trio.SocketStream, ws: WebSocketConnection) -> None:
        self.stream = stream
        self.ws = ws

    @classmethod
    async def connect(cls, nursery: trio.Nursery, gateway: str, resource: str) -> VanishingClient:
        host, _, port = gateway.removeprefix("http://").partition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        ws = await wrap_client_stream(nursery, stream, f"{host}:{port}", resource)
        return cls(stream, ws)

    async def reset(self) -> None:
        """An RST, as a crashed client's kernel would send: no close frame, no FIN."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(self.stream)


async def refusal(url: str, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, Any]:
    """The status and JSON body of a refused handshake."""
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(url, extra_headers=headers):
            pass
    body = json.loads(rejected.value.body or b"null")
    return rejected.value.status_code, body
