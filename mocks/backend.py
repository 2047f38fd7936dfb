"""The mock backend's state (options, counters) and its face as an ASGI app.

Invariants: every request but those to `/mock/stats` is counted in `by_path` and sets
`last_headers`; a generation request counts once in `requests` when it arrives and, when its
outcome is decided, once in exactly one of `completed`, `client_disconnects` or `dropped` (a
completed one before its last chunk goes out, so a client holding its answer finds it counted).
`active` is a gauge of the requests in flight, so a reset leaves it alone.
"""

import random
import time
from collections import Counter, deque
from collections.abc import Mapping
from typing import TypedDict

import attrs
import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseStartEvent,
    HTTPScope,
    Scope,
)

from .answers import answer, is_generation
from .options import MockOptions
from .playback import Connection, Outcome, play
from .realtime import Realtime, RealtimeStats
from .replies import Reply, Request, error_reply, json_reply

STATS_PATH = "/mock/stats"
MAX_DISCONNECTS = 10_000  # the most recent disconnects kept for benchmarks to read


class Disconnect(TypedDict):
    request_id: str | None  # the request's `x-request-id`
    at: float  # time.time() when the mock noticed the client had gone


class MockStats(TypedDict):
    """What `GET /mock/stats` returns."""

    requests: int
    active: int
    completed: int
    client_disconnects: int
    dropped: int
    by_path: dict[str, int]
    last_headers: dict[str, str]
    disconnects: list[Disconnect]
    realtime: RealtimeStats  # the WebSocket sessions of /v1/realtime


@attrs.define
class _Counters:
    requests: int = 0
    completed: int = 0
    client_disconnects: int = 0
    dropped: int = 0
    by_path: Counter[str] = attrs.Factory(Counter)
    last_headers: Mapping[str, str] = attrs.Factory(dict)
    disconnects: deque[Disconnect] = attrs.Factory(lambda: deque(maxlen=MAX_DISCONNECTS))


class MockLLM:
    """One mock LLM backend; the instance is also its ASGI app."""

    def __init__(self, options: MockOptions | None = None, *, rng: random.Random | None = None):
        self.options = options if options is not None else MockOptions()
        # Draws the fail rate and the words of sampled answers; tests pass a seeded one.
        self.rng = rng if rng is not None else random.Random()
        self._active = 0
        self._counters = _Counters()
        self.realtime = Realtime(self.options)

    def stats(self) -> MockStats:
        """A snapshot of the counters, as `GET /mock/stats` returns them."""
        counters = self._counters
        return {
            "requests": counters.requests,
            "active": self._active,
            "completed": counters.completed,
            "client_disconnects": counters.client_disconnects,
            "dropped": counters.dropped,
            "by_path": dict(counters.by_path),
            "last_headers": dict(counters.last_headers),
            "disconnects": list(counters.disconnects),
            "realtime": self.realtime.stats(),
        }

    def reset_stats(self) -> None:
        self._counters = _Counters()

    def _stats_reply(self, method: str) -> Reply:
        if method == "DELETE":
            self.reset_stats()
        elif method != "GET":
            return error_reply(405, f"{STATS_PATH} takes GET or DELETE")
        return json_reply(200, self.stats())

    def _end(self, request: Request, outcome: Outcome) -> None:
        self._active -= 1
        counters = self._counters
        if outcome is Outcome.COMPLETED:
            counters.completed += 1
        elif outcome is Outcome.DROPPED:
            counters.dropped += 1
        else:
            counters.client_disconnects += 1
            request_id = request.headers.get("x-request-id")
            counters.disconnects.append({"request_id": request_id, "at": time.time()})

    async def respond(self, request: Request, connection: Connection) -> Outcome:
        """Answer one request on `connection`, counting it; the server acts on the outcome."""
        if request.path == STATS_PATH:
            return await play(self._stats_reply(request.method), connection)
        self._counters.by_path[request.path] += 1
        self._counters.last_headers = request.headers
        reply = answer(request, self.options, now=time.time(), rng=self.rng)
        if not is_generation(request):
            return await play(reply, connection)
        self._counters.requests += 1
        self._active += 1
        ended = False

        def end(outcome: Outcome) -> None:
            nonlocal ended
            ended = True
            self._end(request, outcome)

        try:
            return await play(reply, connection, end)
        finally:
            if not ended:
                self._active -= 1  # cancelled with its server: no outcome to count

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """The ASGI app that Hypercorn serves."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._asgi_http(scope, receive, send)
        else:
            await self.realtime.serve(dict(scope), receive, send)

    async def _asgi_http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before its request was whole: nothing to answer or count
            if message["type"] == "http.request":
                body += message["body"]
                if not message["more_body"]:
                    break
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        request = Request(scope["method"], scope["path"], headers, bytes(body))
        # Returning with the body unfinished (a drop) makes Hypercorn close the connection.
        await self.respond(request, _AsgiConnection(receive, send))


class _AsgiConnection:
    """One request as Hypercorn hands it over: `send` never fails, only `receive` tells of a
    disconnect, so a watcher must be blocked in `receive` to notice one (see PITFALLS.md)."""

    def __init__(self, receive: ASGIReceiveCallable, send: ASGISendCallable):
        self._receive = receive
        self._send = send
        self._head: HTTPResponseStartEvent | None = None
        self._complete = False

    def start(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        encoded = [(name.encode(), value.encode()) for name, value in headers]
        self._head = {"type": "http.response.start", "status": status, "headers": encoded}

    async def write(self, data: bytes, *, last: bool) -> bool:
        if self._head is not None:
            await self._send(self._head)
            self._head = None
        self._complete = last
        await self._send({"type": "http.response.body", "body": data, "more_body": not last})
        return True

    async def wait_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if self._complete:
            # Hypercorn reports the end of every finished response as a disconnect, from inside
            # the last `send`: no client left, and cancelling that `send` would cut Hypercorn's
            # keep-alive bookkeeping short.
            await trio.sleep_forever()


async def _lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Nothing to set up or tear down; answering keeps Hypercorn from logging a lifespan error."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
