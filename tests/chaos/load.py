"""Load while a fault happens: non-streaming requests at a steady rate, long streams beside them.

Every request's end is recorded as a `Seen`: the status (0: no HTTP answer), the backend that
answered (`x-ntonix-backend`), how a stream ended (`done` with `[DONE]`, `error` with an error
event, `cut` with neither) and how long it took. Stopping lets the requests in flight finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import httpx
import trio

from tests.chaos.harness import CHAT, chat

# A long stream: 40 tokens 50 ms apart, two seconds of generation.
LONG_STREAM = {"x-mock-tokens": "40", "x-mock-token-delay": "0.05"}


@attrs.frozen
class Seen:
    kind: str  # "plain" or "stream"
    status: int
    backend: str
    end: str  # "done", "error", "cut" (streams); "ok" or the exception (plain)
    started: float
    elapsed: float


@attrs.define
class Load:
    url: str
    rate: float = 20.0  # non-streaming requests per second
    streams: int = 6  # long streams kept open at all times
    # The body of each non-streaming request (the same question every time by default).
    body: Callable[[], dict[str, Any]] = lambda: chat(False)
    stream_headers: dict[str, str] = attrs.Factory(lambda: dict(LONG_STREAM))
    seen: list[Seen] = attrs.Factory(list)
    _stopping: trio.Event = attrs.Factory(trio.Event)
    # Its own client, closed when the load ends: its keep-alive connections must not count as
    # connections the gateway left open.
    client: httpx.AsyncClient = attrs.Factory(
        lambda: httpx.AsyncClient(timeout=15, limits=httpx.Limits(max_connections=200))
    )

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.client, trio.open_nursery() as nursery:
            for _ in range(self.streams):
                nursery.start_soon(self._streams)
            task_status.started()
            while not self._stopping.is_set():
                nursery.start_soon(self._plain)
                with trio.move_on_after(1 / self.rate):
                    await self._stopping.wait()

    def stop(self) -> None:
        self._stopping.set()

    async def _plain(self) -> None:
        started = time.monotonic()
        try:
            response = await self.client.post(f"{self.url}{CHAT}", json=self.body())
        except httpx.HTTPError as error:
            self._note("plain", 0, "", type(error).__name__, started)
            return
        end = "ok" if b'"choices"' in response.content else response.text[:200]
        self._note("plain", response.status_code, _backend(response), end, started)

    async def _streams(self) -> None:
        while not self._stopping.is_set():
            await self.stream()

    async def stream(self, headers: dict[str, str] | None = None) -> Seen:
        started = time.monotonic()
        body = b""
        status, backend = 0, ""
        try:
            async with self.client.stream(
                "POST",
                f"{self.url}{CHAT}",
                json=chat(True),
                headers=headers or self.stream_headers,
            ) as response:
                status, backend = response.status_code, _backend(response)
                async for chunk in response.aiter_raw():
                    body += chunk
        except httpx.HTTPError:
            pass
        end = "done" if b"data: [DONE]" in body else "error" if b"event: error" in body else "cut"
        return self._note("stream", status, backend, end, started)

    def _note(self, kind: str, status: int, backend: str, end: str, started: float) -> Seen:
        seen = Seen(kind, status, backend, end, started, time.monotonic() - started)
        self.seen.append(seen)
        return seen

    def plain(self) -> list[Seen]:
        return [seen for seen in self.seen if seen.kind == "plain"]

    def streamed(self) -> list[Seen]:
        return [seen for seen in self.seen if seen.kind == "stream"]


def failures(seen: Sequence[Seen]) -> list[Seen]:
    """Non-streaming requests that did not get a 200 completion."""
    return [one for one in seen if one.kind == "plain" and (one.status != 200 or one.end != "ok")]


def _backend(response: httpx.Response) -> str:
    return response.headers.get("x-ntonix-backend", "")
