"""The framework floor of scenarios (f), (b) and (c): `python -m bench.floor --bind HOST:PORT`.

A minimal ASGI app served by Hypercorn's own `worker_serve` in `trio.run`, one process (or, with
`--processes N`, N processes on one socket bound before they start, as `ntonix serve --workers
N` shares its sockets), with the gateway's `hypercorn_config`, so that what it costs is what
Hypercorn and Trio cost before the gateway does anything. (`ntonix serve` runs Hypercorn's
TCPServer behind listeners of its own, which cap connections: that cap is the gateway's code, so
the floor leaves it out.) It reads each request's body, as the gateway must, then:
- a body that says `"stream": true` gets the mock's SSE stream for that request (same headers,
  events and delays, `x-mock-tokens`, `x-mock-ttft` and `x-mock-token-delay` honoured, the mock's
  defaults otherwise), so that (b) and (c) can run at the floor in place of gateway and mocks;
- any other request gets a fixed JSON body the size of the mock's non-streaming chat completion
  (8 tokens), so that the bytes on the wire match (a).

Invariant: a request costs no JSON and no per-token work; every answer is built before it is
needed (a stream once per set of timing headers, by the mock's own code), so the floor only
sleeps and sends. It does not watch for clients that leave: none do in the scenarios it serves.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.typing import Framework

from mocks.answers import answer
from mocks.options import MockOptions
from mocks.replies import Request
from ntonix.config import Config, GatewaySettings
from ntonix.server import hypercorn_config, listening_sockets, wait_for_stop_signal

Message = dict[str, Any]

# Shaped like the mock's answer (316 bytes there); built once, so a request costs no JSON work.
BODY = json.dumps(
    {
        "id": "chatcmpl-0123456789abcdef01234567",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "mock-llm",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " hot blue on and big the sun out"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16},
    },
    separators=(",", ":"),
).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

# The request headers that shape a stream, as Hypercorn hands them over (lowercase bytes).
TIMING_HEADERS = frozenset({b"x-mock-tokens", b"x-mock-ttft", b"x-mock-token-delay"})
# How the bench's bodies (json.dumps) and compact JSON spell a streaming request: a substring
# test instead of a JSON parse, since parsing is the gateway's own work, not the framework's.
STREAM_FLAGS = (b'"stream": true', b'"stream":true')
_STREAM_REQUEST_BODY = json.dumps(
    {"model": "mock-llm", "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()

Timing = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Stream:
    """One SSE answer as ASGI messages, each with the seconds to wait before sending it."""

    start: Message
    bodies: tuple[tuple[float, Message], ...]


def build_stream(options: MockOptions, timing: Timing) -> Stream:
    """The mock's reply to a streaming chat completion with these timing headers."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in timing}
    request = Request("POST", "/v1/chat/completions", headers, _STREAM_REQUEST_BODY)
    # Seeded: the words (and so the event sizes) are one of the mock's samples, the same each run.
    reply = answer(request, options, now=time.time(), rng=random.Random(0))
    start = {
        "type": "http.response.start",
        "status": reply.status,
        "headers": [(name.encode(), value.encode()) for name, value in reply.headers],
    }
    last = len(reply.chunks) - 1
    bodies = tuple(
        (
            chunk.delay,
            {"type": "http.response.body", "body": chunk.data, "more_body": index < last},
        )
        for index, chunk in enumerate(reply.chunks)
    )
    return Stream(start, bodies)


class Streams:
    """Every stream the floor has answered, by timing headers: each is built on first use."""

    def __init__(self, options: MockOptions) -> None:
        self._options = options
        self._built: dict[Timing, Stream] = {}

    def get(self, timing: Timing) -> Stream:
        stream = self._built.get(timing)
        if stream is None:
            stream = self._built[timing] = build_stream(self._options, timing)
        return stream


async def app(
    streams: Streams,
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    # The whole body first: the gateway reads it before it picks a backend.
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    if not any(flag in body for flag in STREAM_FLAGS):
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
        return
    stream = streams.get(tuple(h for h in scope["headers"] if h[0] in TIMING_HEADERS))
    # The mock sends its head with the first event, which a chat stream sends at once.
    await send(stream.start)
    for delay, message in stream.bodies:
        if delay:
            await trio.sleep(delay)
        await send(message)


def _serve(settings: HypercornConfig, sockets: Sockets | None) -> None:
    # The mock's defaults, as `python -m mocks.llm` has them; the name says who answered.
    streams = Streams(MockOptions(name="floor"))
    trio.run(
        partial(
            worker_serve,
            ASGIWrapper(cast("Framework", partial(app, streams))),
            settings,
            sockets=sockets,
            shutdown_trigger=wait_for_stop_signal,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--bind", required=True, help="HOST:PORT")
    parser.add_argument(
        "--processes", type=int, default=1, help="serving processes on one shared socket (1)"
    )
    args = parser.parse_args(argv)
    # The bench's gateway config has graceful_timeout 5 too; no backends, none are called.
    config = Config(backends=(), gateway=GatewaySettings(graceful_timeout=5.0))
    settings = hypercorn_config(config, [args.bind])
    if args.processes == 1:
        _serve(settings, None)
        return 0
    # As `ntonix serve --workers N` does: bound once here, shared by the processes.
    sockets = listening_sockets(settings)
    spawn = multiprocessing.get_context("spawn")
    children = [
        spawn.Process(target=_serve, args=(settings, sockets)) for _ in range(args.processes)
    ]
    for child in children:
        child.start()

    def stop(signum: int, frame: object) -> None:
        for child in children:
            if child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
