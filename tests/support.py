"""Helpers for tests that talk to real servers over real sockets."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import trio


def chat(content: str = "Hello", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A deterministic chat completion request (temperature 0) unless told otherwise."""
    return {
        "model": "mock-llm",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        "temperature": 0,
        **extra,
    }


def sse_events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll until predicate() holds; return how long it took. Fails the test on timeout."""
    start = time.monotonic()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.002)
    return time.monotonic() - start


async def status(client: httpx.AsyncClient, gateway: str) -> dict[str, Any]:
    response = await client.get(f"{gateway}/ntonix/status")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def pool_totals(snapshot: dict[str, Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for backend in snapshot["backends"]:
        for key, value in backend["pool"].items():
            totals[key] = totals.get(key, 0) + value
    return totals


class RawClient:
    """An HTTP/1.1 client on a bare socket, for tests that must hang up at an exact moment."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = b""

    @classmethod
    async def connect(cls, base_url: str) -> RawClient:
        url = httpx.URL(base_url)
        return cls(await trio.open_tcp_stream(url.host, url.port or 80))

    async def send_request(
        self,
        method: str,
        path: str,
        payload: object | None = None,
        *,
        headers: dict[str, str] | None = None,
        body_bytes_to_send: int | None = None,
    ) -> None:
        body = json.dumps(payload).encode() if payload is not None else b""
        lines = [f"{method} {path} HTTP/1.1", "host: test", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if payload is not None:
            lines.append("content-type: application/json")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        sent = body if body_bytes_to_send is None else body[:body_bytes_to_send]
        await self.stream.send_all(head + sent)

    async def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        with trio.fail_after(timeout):
            while marker not in self.received:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"closed before {marker!r}; got {self.received!r}")
                self.received += data
        return self.received

    async def hang_up(self) -> float:
        """Close the connection; returns the wall-clock time of the close."""
        self.stream.socket.close()
        return time.time()
