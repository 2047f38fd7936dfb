"""The live dashboard: one self-contained HTML page and the websocket that feeds it.

Invariants: a websocket connection is served by exactly one `stream_snapshots` call, which
returns once the client has gone and leaves no task behind; the page loads nothing from
anywhere but the gateway that served it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources

import trio

from ntonix.asgi import Receive, Send


@cache
def page() -> bytes:
    """The dashboard's HTML (dashboard.html, shipped inside the package), read once."""
    return resources.files("ntonix").joinpath("dashboard.html").read_bytes()


async def stream_snapshots(
    receive: Receive,
    send: Send,
    snapshot: Callable[[], Awaitable[dict[str, object]]],
    stopping: trio.Event,
    interval: float = 1.0,
) -> None:
    """Serve one ASGI websocket: accept it, then send `await snapshot()` as JSON at once and every
    `interval` seconds until the client goes away or `stopping` is set (the server is shutting
    down: the page is told "going away" and reconnects later, instead of holding up the drain).

    Hypercorn reports a departed client only through `receive()` (its `send()` then discards
    quietly), so a watcher task waits there while the sender loops; whichever ends first
    cancels the others.
    """
    if (await receive())["type"] != "websocket.connect":
        return  # the client left before the handshake reached us
    if stopping.is_set():
        await send({"type": "websocket.close", "code": GOING_AWAY})
        return
    await send({"type": "websocket.accept"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
        nursery.start_soon(_close_when_stopping, stopping, send, nursery.cancel_scope)
        await _send_every(send, snapshot, interval)
        nursery.cancel_scope.cancel()


GOING_AWAY = 1001  # RFC 6455: the server is going down


async def _close_when_stopping(stopping: trio.Event, send: Send, done: trio.CancelScope) -> None:
    await stopping.wait()
    # Cancel first: a snapshot must not follow the close.
    done.cancel()
    with trio.CancelScope(shield=True), contextlib.suppress(OSError):
        await send({"type": "websocket.close", "code": GOING_AWAY})


async def _until_disconnect(receive: Receive, done: trio.CancelScope) -> None:
    # Whatever the client sends is ignored: the stream goes one way.
    while (await receive())["type"] != "websocket.disconnect":
        pass
    done.cancel()


async def _send_every(
    send: Send, snapshot: Callable[[], Awaitable[dict[str, object]]], interval: float
) -> None:
    """Returns only when sending fails: ASGI servers other than Hypercorn raise an OSError
    (the spec's IOError) on a closed connection."""
    while True:
        try:
            await send({"type": "websocket.send", "text": json.dumps(await snapshot())})
        except OSError:
            return
        await trio.sleep(interval)
