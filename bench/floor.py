"""The framework floor of scenario (f): `python -m bench.floor --bind HOST:PORT`.

A minimal ASGI app served exactly as `ntonix serve` serves the gateway with one worker (the same
`hypercorn_config`, `hypercorn.trio.serve` in `trio.run`, one process), so that its CPU per
request is what Hypercorn and Trio cost before the gateway does anything. It reads each request's
body, as the gateway must, and answers with a fixed JSON body the size of the mock's non-streaming
chat completion (8 tokens), so that the bytes on the wire match (a).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import trio
from hypercorn.trio import serve
from hypercorn.typing import Framework

from ntonix.config import Config, GatewaySettings
from ntonix.server import hypercorn_config, wait_for_stop_signal

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


async def app(
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
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--bind", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    # The bench's gateway config has graceful_timeout 5 too; no backends, none are called.
    config = Config(backends=(), gateway=GatewaySettings(graceful_timeout=5.0))
    settings = hypercorn_config(config, [args.bind])
    trio.run(
        partial(
            serve,
            cast("Framework", app),
            settings,
            shutdown_trigger=wait_for_stop_signal,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
