"""The disconnect watcher and the last send of a response (downstream.py), driven directly."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing

from ntonix.core.telemetry import RequestRecord
from ntonix.downstream import LAST_SEND_GRACE, Downstream, cancel_on_disconnect


def _record() -> RequestRecord:
    return RequestRecord(
        started=0.0,
        wall_time=0.0,
        request_id=b"r",
        client="10.0.0.7",
        method="POST",
        path="/v1/chat/completions",
        cache="",
    )


async def _respond(last_send: Callable[[trio.Event], Awaitable[None]]) -> RequestRecord:
    """One response whose last send is `last_send(disconnect)`, beside the watcher; returns the
    record once the request's nursery has ended."""
    disconnect = trio.Event()
    record = _record()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            await last_send(disconnect)

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    downstream = Downstream(send, record)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_on_disconnect, receive, downstream, nursery.cancel_scope)
        await downstream.start(200, [])
        await downstream.write(b"{}", more=False)
        nursery.cancel_scope.cancel()  # as Proxy.handle does once the response is out
    return record


async def test_the_end_of_a_response_reported_from_its_last_send_is_no_disconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def hypercorn_ends_the_response(disconnect: trio.Event) -> None:
        disconnect.set()  # Hypercorn's notice that the stream closed, from inside this send
        await trio.sleep(0.01)

    record = await _respond(hypercorn_ends_the_response)
    assert not record.disconnected
    assert record.outcome != "client_disconnected"


async def test_a_client_gone_while_the_last_send_waits_cancels_the_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def waits_for_window_for_ever(disconnect: trio.Event) -> None:
        disconnect.set()  # the client leaves; this send never returns (plain hypercorn, HTTP/2)
        await trio.sleep_forever()

    with trio.fail_after(60):  # virtual time: without the grace the request never ends
        record = await _respond(waits_for_window_for_ever)
    assert record.disconnected and record.outcome == "client_disconnected"
    assert trio.current_time() >= LAST_SEND_GRACE
