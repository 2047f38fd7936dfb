"""The mock backend's state (options, counters) and its face as an ASGI app.

Invariants: every request but those to `/mock/stats` is counted in `by_path`, and every one
but those and the reads of load signals (`SIGNAL_PATHS`, polled every second by a gateway)
sets `last_headers`; a generation request counts once in `requests` when it arrives and, when
its outcome is decided, once in exactly one of `completed`, `client_disconnects` or `dropped`
(a completed one before its last chunk goes out, so a client holding its answer finds it
counted). With `slots`, at most that many generate at once (`running`); the others wait in
arrival order (`waiting`), a client that leaves while waiting leaves the queue, and `waited`
counts those that had to. `active`, `running` and `waiting` are gauges, so a reset leaves them
alone.
"""

import json
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
from .engines import EngineState, signals_reply
from .fin_clock import Clock
from .options import MockOptions
from .playback import Connection, Outcome, play
from .realtime import Realtime, RealtimeStats
from .replies import Reply, Request, error_reply, json_reply

STATS_PATH = "/mock/stats"
MAX_DISCONNECTS = 10_000  # the most recent disconnects kept for benchmarks to read
SIGNAL_PATHS = frozenset({"/metrics", "/api/ps", "/slots"})


class Disconnect(TypedDict):
    request_id: str | None  # the request's `x-request-id`
    at: float  # time.time() when the mock noticed the client had gone
    closed_at: float  # time.time() when its close reached the socket (`at` if unknown)
    clock: str  # what took `closed_at`: "kernel", "thread" (mocks/fin_clock.py) or "loop" (`at`)


class MockStats(TypedDict):
    """What `GET /mock/stats` returns."""

    requests: int
    active: int
    running: int  # generating now
    waiting: int  # queued for a slot now
    waited: int  # requests that had to queue for a slot
    max_waiting: int
    cold_loads: int  # requests that had to load their model first
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
    waited: int = 0
    max_waiting: int = 0
    cold_loads: int = 0
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
        self._running = 0
        self._waiting = 0
        self._slots = trio.Semaphore(self.options.slots) if self.options.slots else None
        models = self.options.models if self.options.loaded is None else self.options.loaded
        self._loaded = dict.fromkeys(models, time.time())  # model -> last used
        self._counters = _Counters()
        self.realtime = Realtime(self.options)

    def stats(self) -> MockStats:
        """A snapshot of the counters, as `GET /mock/stats` returns them."""
        counters = self._counters
        return {
            "requests": counters.requests,
            "active": self._active,
            "running": self._running,
            "waiting": self._waiting,
            "waited": counters.waited,
            "max_waiting": counters.max_waiting,
            "cold_loads": counters.cold_loads,
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

    def _end(self, request: Request, outcome: Outcome, connection: Connection) -> None:
        self._active -= 1
        counters = self._counters
        if outcome is Outcome.COMPLETED:
            counters.completed += 1
        elif outcome is Outcome.DROPPED:
            counters.dropped += 1
        else:
            counters.client_disconnects += 1
            request_id = request.headers.get("x-request-id")
            at = time.time()
            closed_at, clock = connection.closed_at() or (at, "loop")  # `at` bounds it
            counters.disconnects.append(
                {
                    "request_id": request_id,
                    "at": at,
                    "closed_at": min(closed_at, at),
                    "clock": clock if closed_at <= at else "loop",
                }
            )

    async def respond(self, request: Request, connection: Connection) -> Outcome:
        """Answer one request on `connection`, counting it; the server acts on the outcome."""
        if request.path == STATS_PATH:
            return await play(self._stats_reply(request.method), connection)
        self._counters.by_path[request.path] += 1
        if request.method == "GET" and request.path in SIGNAL_PATHS:
            state = EngineState(self._waiting, self._running, tuple(self._loaded.items()))
            signals = signals_reply(request.path, self.options, state, now=time.time())
            if signals is not None:
                return await play(signals, connection)
        else:
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
            self._end(request, outcome, connection)

        try:
            if self._slots is not None and not await self._take_slot(connection):
                end(Outcome.DISCONNECTED)
                return Outcome.DISCONNECTED
            self._running += 1
            try:
                return await play(self._loading(request, reply), connection, end)
            finally:
                self._running -= 1
                if self._slots is not None:
                    self._slots.release()
        finally:
            if not ended:
                self._active -= 1  # cancelled with its server: no outcome to count

    async def _take_slot(self, connection: Connection) -> bool:
        """Wait in line for a generation slot; False when the client left first."""
        assert self._slots is not None
        try:
            self._slots.acquire_nowait()  # a free slot means nobody waits: release hands over
            return True
        except trio.WouldBlock:
            pass
        counters = self._counters
        counters.waited += 1
        self._waiting += 1
        counters.max_waiting = max(counters.max_waiting, self._waiting)
        taken = False
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await connection.wait_disconnect()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await self._slots.acquire()
                taken = True
                nursery.cancel_scope.cancel()
        finally:
            self._waiting -= 1
        return taken

    def _loading(self, request: Request, reply: Reply) -> Reply:
        """`reply`, later by `load_time` when its model is not in memory yet (then it is)."""
        if reply.status != 200:
            return reply
        model = json.loads(request.body)["model"]  # a 200 means answer() found it there
        cold = model not in self._loaded
        self._loaded[model] = time.time()
        if not cold:
            return reply
        self._counters.cold_loads += 1
        first, *rest = reply.chunks
        return attrs.evolve(
            reply, chunks=(attrs.evolve(first, delay=first.delay + self.options.load_time), *rest)
        )

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

    def closed_at(self) -> tuple[float, Clock] | None:
        return None  # Hypercorn's reader learns it first, then the disconnect message

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
