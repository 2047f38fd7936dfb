"""The request's `Inbox` (inbox.py) as a queue: order, its bound, and cancellation on both ends."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ntonix.inbox import Inbox, InboxTaskGroup


def _body(n: int) -> dict[str, object]:
    return {"type": "http.request", "body": bytes([n]), "more_body": True}


async def test_messages_arrive_in_order_and_a_reader_waits_for_the_next() -> None:
    inbox = Inbox(10)
    await inbox.put(_body(1))
    await inbox.put(_body(2))
    assert [(await inbox())["body"], (await inbox())["body"]] == [b"\x01", b"\x02"]
    got: list[object] = []

    async def read() -> None:
        got.append((await inbox())["body"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await inbox.put(_body(3))
    assert got == [b"\x03"]


async def test_a_full_inbox_holds_the_writer_until_the_reader_takes_one() -> None:
    inbox = Inbox(2)
    await inbox.put(_body(1))
    await inbox.put(_body(2))
    written = trio.Event()

    async def write() -> None:
        await inbox.put(_body(3))
        written.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()
        assert not written.is_set()
        assert (await inbox())["body"] == b"\x01"
        await written.wait()
    assert [(await inbox())["body"] for _ in range(2)] == [b"\x02", b"\x03"]


async def test_cancelled_waits_leave_the_inbox_usable() -> None:
    inbox = Inbox(1)
    with trio.move_on_after(0.01):
        await inbox()  # nothing queued: the reader gives up
    await inbox.put(_body(1))
    with trio.move_on_after(0.01):
        await inbox.put(_body(2))  # full: the writer gives up, its message is not queued
    assert (await inbox())["body"] == b"\x01"
    await inbox.put(_body(3))
    assert (await inbox())["body"] == b"\x03"


async def test_two_readers_at_once_are_refused() -> None:
    inbox = Inbox(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbox)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await inbox()
        nursery.cancel_scope.cancel()


async def test_the_disconnect_calls_back_before_it_is_read() -> None:
    inbox = Inbox(1)
    calls: list[str] = []
    inbox.on_disconnect(lambda: calls.append("gone"))
    await inbox.put({"type": "http.disconnect"})
    assert calls == ["gone"]
    assert (await inbox())["type"] == "http.disconnect"
    inbox.on_disconnect(lambda: calls.append("late"))  # set after the disconnect: runs at once
    assert calls == ["gone", "late"]


async def test_it_says_when_the_request_s_last_message_is_queued() -> None:
    inbox = Inbox(10)
    assert not inbox.holds_the_end()
    await inbox.put(_body(1))
    assert not inbox.holds_the_end()  # more body to come: reading it may wait
    await inbox.put({"type": "http.request", "body": b"", "more_body": False})
    assert inbox.holds_the_end()
    await inbox()
    assert inbox.holds_the_end()  # the end is still queued behind the first part
    await inbox()
    assert not inbox.holds_the_end()
    await inbox.put({"type": "http.disconnect"})
    assert inbox.holds_the_end()


async def test_a_hang_up_calls_back_the_listening_inboxes_once() -> None:
    group = InboxTaskGroup()
    listening, quiet = Inbox(10, group), Inbox(10, group)
    calls: list[str] = []
    listening.on_disconnect(lambda: calls.append("gone"))
    group.hang_up()  # the worker's hang-up watch saw the client's close
    assert calls == ["gone"]
    assert not quiet.disconnected  # no callback: it learns from Hypercorn's message
    await listening.put({"type": "http.disconnect"})  # Hypercorn's, later: no second call
    assert calls == ["gone"]
    assert (await listening())["type"] == "http.disconnect"
    listening.on_disconnect(None)
    assert group.listening == set()
