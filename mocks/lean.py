"""The lean server: the mock over plain HTTP/1.1 on trio sockets and h11, for benchmarks.

Hypercorn's ASGI machinery costs more CPU per request than a benchmark's backend can afford; this
serves the same replies with keep-alive, content-length and chunked bodies, and little else.
Invariants: a request's body is read whole before it is answered; while a reply plays, only the
disconnect watcher reads the socket, and bytes it reads (a pipelined request) stay in h11's buffer
for the next cycle; a dropped reply ends with an RST (SO_LINGER 0), not a FIN.
"""

import socket
import struct
from functools import partial

import h11
import trio

from .backend import MockLLM
from .fin_clock import FIN_CLOCK, Clock
from .playback import Outcome, play
from .replies import Request, error_reply

_RECEIVE_SIZE = 65536


async def serve_lean(
    mock: MockLLM,
    *,
    host: str,
    port: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `mock` until cancelled; report the bound port."""
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, partial(_serve_connection, mock), port, host=host)
        )
        bound = listeners[0].socket.getsockname()[1]
        FIN_CLOCK.listen(bound)
        try:
            task_status.started(bound)
            await trio.sleep_forever()
        finally:
            FIN_CLOCK.unlisten(bound)


class _LeanConnection:
    """One request's side of an h11 connection; the head goes out with the first chunk."""

    def __init__(self, conn: h11.Connection, stream: trio.SocketStream):
        self._conn = conn
        self._stream = stream
        self._head: h11.Response | None = None

    def start(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        self._head = h11.Response(status_code=status, headers=list(headers))

    async def write(self, data: bytes, *, last: bool) -> bool:
        out = b"" if self._head is None else self._conn.send(self._head)
        self._head = None
        out += self._conn.send(h11.Data(data=data))  # h11 writes nothing for an empty chunk
        if last:
            out += self._conn.send(h11.EndOfMessage())
        try:
            await self._stream.send_all(out)
        except trio.BrokenResourceError:
            return False
        return True

    async def wait_disconnect(self) -> None:
        FIN_CLOCK.watch(self._stream.socket)
        while True:
            try:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            self._conn.receive_data(data)

    def closed_at(self) -> tuple[float, Clock] | None:
        return FIN_CLOCK.closed_at(self._stream.socket)


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
    """The next request on the connection, or None once the client has closed it."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            target = head.target.decode("latin-1")
            headers = {
                name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers
            }
            path = target.partition("?")[0]
            return Request(head.method.decode("latin-1"), path, headers, bytes(body))
        else:
            return None  # ConnectionClosed: the client left between requests


async def _serve_connection(mock: MockLLM, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        try:
            request = await _read_request(conn, stream)
        except trio.BrokenResourceError:
            return
        except h11.RemoteProtocolError as error:
            if conn.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                reply = error_reply(error.error_status_hint, str(error))
                await play(reply, _LeanConnection(conn, stream))
            return
        if request is None:
            return
        try:
            outcome = await mock.respond(request, _LeanConnection(conn, stream))
        finally:
            FIN_CLOCK.forget(stream.socket)
        if outcome is Outcome.DROPPED:
            # Linger 0 makes the close below an RST: the abrupt end a crashed server gives.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if outcome is not Outcome.COMPLETED or not reusable:
            return  # trio.serve_tcp closes the stream
        conn.start_next_cycle()
