"""The disconnect watch and the last send of a response (downstream.py), driven directly."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from ntonix.core.telemetry import RequestRecord
from ntonix.downstream import LAST_SEND_GRACE, Downstream, cancelled_on_disconnect
from ntonix.inbox import Inbox
from ntonix.watchdog import TICK, IdleWatch
from tests.support import chat_record


async def _respond(
    last_send: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]], via: str
) -> RequestRecord:
    """One response whose last send is `last_send(disconnect)`, in `cancelled_on_disconnect`
    as Proxy.handle runs it; returns the record once the request has ended. `via` "task":
    `receive` is a plain function, watched by a task (the plain hypercorn command); "inbox":
    an `Inbox`, whose disconnect message calls back (`ntonix serve`)."""
    disconnected = trio.Event()
    inbox = Inbox(10)
    record = chat_record()

    async def disconnect() -> None:
        if via == "inbox":
            await inbox.put({"type": "http.disconnect"})
        disconnected.set()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            await last_send(disconnect)

    async def receive() -> dict[str, Any]:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    downstream = Downstream(send, record)
    timers = IdleWatch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        async with cancelled_on_disconnect(
            inbox if via == "inbox" else receive, downstream, timers
        ):
            await downstream.start(200, [])
            await downstream.write(b"{}", more=False)
        nursery.cancel_scope.cancel()
    return record


VIAS = pytest.mark.parametrize("via", ["task", "inbox"])


@VIAS
async def test_the_end_of_a_response_reported_from_its_last_send_is_no_disconnect(
    autojump_clock: trio.testing.MockClock, via: str
) -> None:
    async def hypercorn_ends_the_response(disconnect: Callable[[], Awaitable[None]]) -> None:
        await disconnect()  # Hypercorn's notice that the stream closed, from inside this send
        await trio.sleep(0.01)

    record = await _respond(hypercorn_ends_the_response, via)
    assert not record.disconnected
    assert record.outcome != "client_disconnected"


@VIAS
async def test_a_client_gone_while_the_last_send_waits_cancels_the_request(
    autojump_clock: trio.testing.MockClock, via: str
) -> None:
    async def waits_for_window_for_ever(disconnect: Callable[[], Awaitable[None]]) -> None:
        await disconnect()  # the client leaves; this send never returns (plain hypercorn, HTTP/2)
        await trio.sleep_forever()

    with trio.fail_after(60):  # virtual time: without the grace the request never ends
        record = await _respond(waits_for_window_for_ever, via)
    assert record.disconnected and record.outcome == "client_disconnected"
    assert LAST_SEND_GRACE <= trio.current_time() <= LAST_SEND_GRACE + TICK


@VIAS
async def test_a_client_gone_mid_response_cancels_the_request_and_closes_its_upstream_at_once(
    autojump_clock: trio.testing.MockClock, via: str
) -> None:
    record = chat_record()
    inbox = Inbox(10)
    left = trio.Event()

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    downstream = Downstream(send, record)
    upstream_closed: list[float] = []
    downstream.on_gone = lambda: upstream_closed.append(trio.current_time())
    async with (
        trio.open_nursery() as nursery,
        cancelled_on_disconnect(inbox if via == "inbox" else receive, downstream, IdleWatch()),
    ):
        await downstream.start(200, [])
        await downstream.write(b"data: 1\n\n", more=True)
        if via == "inbox":
            nursery.start_soon(inbox.put, {"type": "http.disconnect"})
        left.set()
        await trio.sleep_forever()  # the relay, waiting for the backend
    assert trio.current_time() == 0.0
    assert record.disconnected and record.outcome == "client_disconnected"
    assert upstream_closed == [0.0]  # closed from the disconnect itself, before the unwinding
