"""A client's hang-up, hop by hop: it ends its request as a cancellation (never as the backend's
failure), no chunk is written to a client known gone, and the worker's hang-up watch acts on a
client's close before the tasks woken with it run, and from inside a long batch (at a write, or
at another request's end); clients found gone together have their upstreams closed first."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from ntonix.config import BackendSettings
from ntonix.downstream import Downstream, cancelled_on_disconnect
from ntonix.hangups import CHECK_INTERVAL, HangupWatch
from ntonix.inbox import Inbox, InboxTaskGroup
from ntonix.upstream import UpstreamConnection
from ntonix.watchdog import IdleWatch
from tests.support import chat_record


class _WhenWoken(trio.abc.Instrument):
    """Runs `action` from the scheduler once I/O has woken `task`, before it runs: what the
    disconnect does to a request whose backend sent data in the same I/O round as its client
    left."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.action = action
        self.woken = False

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.woken = self.woken or task is self.task

    def after_io_wait(self, timeout: float) -> None:
        if self.woken:
            self.task, self.woken = None, False
            self.action()


async def test_a_read_that_completes_as_the_client_leaves_ends_as_a_cancellation() -> None:
    ours, backend = trio.socket.socketpair()
    stream = trio.SocketStream(ours)
    connection = UpstreamConnection(
        BackendSettings(name="b", url="http://127.0.0.1:1"), stream, stream
    )
    await connection.send_request(b"GET", b"/", [], b"")
    await backend.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    await connection.receive_response()
    scope = trio.CancelScope()

    def client_gone() -> None:  # as `_InboxWatch._client_gone` does: close, then cancel
        connection.close()
        scope.cancel()

    probe = _WhenWoken(client_gone)
    trio.lowlevel.add_instrument(probe)
    try:
        async with trio.open_nursery() as nursery:

            async def relay() -> None:
                probe.task = trio.lowlevel.current_task()
                with scope:
                    await connection.receive_body()

            nursery.start_soon(relay)
            await trio.testing.wait_all_tasks_blocked()
            await backend.send(b"5\r\nhello\r\n")  # readable: the relay is woken, then cancelled
    finally:
        trio.lowlevel.remove_instrument(probe)
        backend.close()
    assert scope.cancelled_caught  # not a GatewayError ("connection broken") from the backend


async def test_a_request_cancelled_after_its_data_was_read_writes_nothing_more() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)  # as Hypercorn's send: shielded, no checkpoint before the socket

    downstream = Downstream(send, chat_record())
    await downstream.start(200, [])
    with trio.CancelScope() as scope:
        await downstream.write(b"data: 1\n\n", more=True)
        scope.cancel()  # the client left while this chunk was on its way from the backend
        await downstream.write(b"data: 2\n\n", more=True)
    assert scope.cancelled_caught
    assert [message.get("body") for message in sent] == [None, b"data: 1\n\n"]


async def test_the_watch_acts_on_a_close_before_the_tasks_woken_by_it_run() -> None:
    watch = HangupWatch()
    ours, client = trio.socket.socketpair()
    calls: list[str] = []
    seen_by_reader: list[list[str]] = []

    async def reader() -> None:  # as Hypercorn's: woken by the same I/O as the watch
        while True:
            await trio.lowlevel.wait_readable(ours)
            seen_by_reader.append(list(calls))
            if not await ours.recv(4096):  # the watch reads nothing: the data is still there
                return

    trio.lowlevel.add_instrument(watch)
    try:
        watch.watch(ours, lambda: calls.append("hung up"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await client.send(b"GET / HTTP/1.1\r\n\r\n")  # data does not wake the watch
            await trio.testing.wait_all_tasks_blocked()
            client.close()
    finally:
        trio.lowlevel.remove_instrument(watch)
        watch.close()
        ours.close()
    assert seen_by_reader == [[], ["hung up"]]  # once, before the reader saw the close
    assert calls == ["hung up"]


async def test_a_forgotten_socket_is_not_watched() -> None:
    watch = HangupWatch()
    ours, client = trio.socket.socketpair()
    calls: list[str] = []

    def hung_up() -> None:
        calls.append("hung up")

    trio.lowlevel.add_instrument(watch)
    try:
        key = watch.watch(ours, hung_up)
        watch.forget(key, lambda: calls.append("another connection's"))  # not its callback
        watch.forget(key, hung_up)
        client.close()
        await trio.lowlevel.wait_readable(ours)  # woken after the watch's turn in that round
    finally:
        trio.lowlevel.remove_instrument(watch)
        watch.close()
        ours.close()
    assert calls == []


async def test_a_close_during_a_batch_is_acted_on_at_the_next_write() -> None:
    watch = HangupWatch()
    ours, client = trio.socket.socketpair()
    calls: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        pass  # as Hypercorn's send to a client with room: no checkpoint

    trio.lowlevel.add_instrument(watch)
    try:
        watch.watch(ours, lambda: calls.append("hung up"))
        await trio.lowlevel.checkpoint()  # an I/O wait: the watch has looked, nothing closed
        downstream = Downstream(send, chat_record())
        downstream.check_hangups = watch.check
        await downstream.start(200, [])
        client.close()
        time.sleep(CHECK_INTERVAL)  # noqa: ASYNC251 - the batch goes on, no I/O wait comes
        await downstream.write(b"data: 1\n\n", more=True)
        assert calls == ["hung up"]  # from inside the batch, not at its end
    finally:
        trio.lowlevel.remove_instrument(watch)
        watch.close()
        ours.close()


async def _send_nothing(message: dict[str, Any]) -> None:
    pass  # as Hypercorn's send to a client with room: no checkpoint


async def test_clients_found_gone_together_have_every_upstream_closed_before_any_cancel() -> None:
    watch = HangupWatch()
    pairs = [trio.socket.socketpair() for _ in range(3)]
    downstreams = [Downstream(_send_nothing, chat_record()) for _ in pairs]
    cancelled_at_each_close: list[int] = []

    def upstream_closed() -> None:
        cancelled_at_each_close.append(sum(d.record.disconnected for d in downstreams))

    async def request(ours: trio.socket.SocketType, downstream: Downstream) -> None:
        group = InboxTaskGroup(watch)
        watch.watch(ours, group.hang_up)
        downstream.on_gone = upstream_closed
        async with cancelled_on_disconnect(Inbox(10, group), downstream, IdleWatch()):
            await downstream.start(200, [])
            await trio.sleep_forever()  # the relay, waiting for the backend

    trio.lowlevel.add_instrument(watch)
    try:
        async with trio.open_nursery() as nursery:
            for (ours, _), downstream in zip(pairs, downstreams, strict=True):
                nursery.start_soon(request, ours, downstream)
            await trio.testing.wait_all_tasks_blocked()
            for _, client in pairs:
                client.close()  # all three before the watch's next look
            await trio.lowlevel.wait_readable(pairs[0][0])  # as Hypercorn's reader is woken
    finally:
        trio.lowlevel.remove_instrument(watch)
        watch.close()
        for ours, _ in pairs:
            ours.close()
    assert cancelled_at_each_close == [0, 0, 0]
    assert all(d.record.outcome == "client_disconnected" for d in downstreams)


async def test_a_close_during_a_batch_is_acted_on_at_another_requests_end() -> None:
    watch = HangupWatch()
    ours, client = trio.socket.socketpair()
    calls: list[str] = []
    trio.lowlevel.add_instrument(watch)
    try:
        watch.watch(ours, lambda: calls.append("hung up"))
        await trio.lowlevel.checkpoint()  # an I/O wait: the watch has looked, nothing closed
        downstream = Downstream(_send_nothing, chat_record())
        async with cancelled_on_disconnect(
            Inbox(10, InboxTaskGroup(watch)), downstream, IdleWatch()
        ):
            await downstream.write(b"", more=False)  # another request's last write, then its end
            client.close()
            time.sleep(CHECK_INTERVAL)  # noqa: ASYNC251 - the batch goes on, no I/O wait comes
        assert calls == ["hung up"]  # at that request's end, not at the batch's
    finally:
        trio.lowlevel.remove_instrument(watch)
        watch.close()
        ours.close()
