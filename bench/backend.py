"""A backend for scenario (i) that costs the machine far less than the lean mock:
`python -m bench.backend --port 0 --name NAME`.

Why: (i) compares the gateway with the framework floor, which plays the streams itself and has
no backend at all. The gateway needs backends, and on this 2-core machine their CPU comes out
of the gateway's: the lean mock (Trio + h11, a task pair and a sleep per chunk) used 0.69 s per
1,000 one-token streams and 145 µs per token, as much as half what the gateway spends on the
same streams. This one answers the same requests with the same bytes at the same times for a
small fraction of that: one process, one `selectors` loop, no task per stream, one timer heap
for every connection's chunks, replies rendered once per distinct request (by the mock's own
`answer`) and then only sent.

It prints `mock NAME listening on http://HOST:PORT` once bound, as `python -m mocks.llm` does,
and exits 0 on SIGTERM or SIGINT.

Invariants: a request's chunks go out at the reply's own delays from the moment the request was
read whole, each group of chunks due at the same instant in one send (as the lean mock's
back-to-back writes arrive); a client that closes its connection has nothing more sent to it;
a reply is the mock's reply to an identical request (same method, path, body and `x-mock-*`
headers), rendered with a fixed random seed: ids, timestamps and words repeat from one request
to the next, which no bench figure reads. Not served (the lean mock's): `/mock/stats`, load
signals, `x-mock-hang`, `x-mock-drop-after` (answered 400), chunked request bodies (501).
"""

from __future__ import annotations

import argparse
import errno
import heapq
import http
import itertools
import random
import selectors
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

from bench.load import raise_open_file_limit
from mocks.answers import answer
from mocks.options import MockOptions
from mocks.replies import Reply, Request, error_reply

RECEIVE_SIZE = 65536
MAX_HEAD = 65536  # a larger request head is refused (the gateway sends a few hundred bytes)
MAX_REPLIES = 1024  # rendered replies kept; more distinct requests start the cache afresh
# accept() failures that concern one connection already gone, not the listening socket.
_GONE_BEFORE_ACCEPT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

# A reply on the wire: (seconds after the request, bytes to send then), in order.
Timeline = tuple[tuple[float, bytes], ...]


def timeline(reply: Reply) -> Timeline:
    """The reply's head and chunks as bytes, grouped by when they are due; chunked transfer
    encoding unless the reply has a content-length, as h11 writes it for the lean mock."""
    whole = any(name == "content-length" for name, _ in reply.headers)
    lines = [f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}"]
    lines += [f"{name}: {value}" for name, value in reply.headers]
    if not whole:
        lines.append("transfer-encoding: chunked")
    pending = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    groups: list[tuple[float, bytes]] = []
    due = 0.0
    for index, chunk in enumerate(reply.chunks):
        if chunk.delay and index > 0:  # the head waits for the first chunk
            groups.append((due, pending))
            pending = b""
        due += chunk.delay
        data = chunk.data
        if not whole and data:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        pending += data
        if not whole and index == len(reply.chunks) - 1:
            pending += b"0\r\n\r\n"
    groups.append((due, pending))
    return tuple((at, data) for at, data in groups if data)


class _Connection:
    """One client connection: what it sent that is not answered yet, what waits to be sent."""

    __slots__ = ("close_after", "open", "received", "replying", "sock", "unsent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = bytearray()
        self.unsent = b""  # bytes the socket did not take yet
        self.open = True
        self.replying = False  # a reply's chunks are still due: the next request waits
        self.close_after = False  # the client asked for `connection: close`


class Backend:
    """The loop: accepts, reads requests, and sends each reply's chunks when they fall due."""

    def __init__(self, listener: socket.socket, options: MockOptions) -> None:
        self._options = options
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._due: list[tuple[float, int, _Connection, bytes, bool]] = []  # a heap
        self._order = itertools.count()  # ties on the heap go in the order they were pushed
        self._replies: dict[tuple[object, ...], Timeline] = {}
        listener.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, self._accept)

    def run(self) -> None:
        """Serve until a signal handler raises (see `main`)."""
        due = self._due
        while True:
            timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
            for key, mask in self._selector.select(timeout):
                callback: Callable[[int], None] = key.data
                callback(mask)
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, connection, data, last = heapq.heappop(due)
                if connection.open:
                    self._send(connection, data, last)

    def _accept(self, mask: int) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in _GONE_BEFORE_ACCEPT:
                    continue
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(sock)
            self._selector.register(
                sock, selectors.EVENT_READ, lambda mask, c=connection: self._ready(c, mask)
            )

    def _ready(self, connection: _Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(connection)
        if mask & selectors.EVENT_READ and connection.open:
            try:
                data = connection.sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the client has gone: nothing more goes out to it
                self._close(connection)
                return
            connection.received += data
            self._next_request(connection)

    def _next_request(self, connection: _Connection) -> None:
        """Answer the request waiting whole in `received`, unless a reply is still playing."""
        if connection.replying:
            return
        received = connection.received
        end = received.find(b"\r\n\r\n")
        if end < 0:
            if len(received) > MAX_HEAD:
                self._close(connection)
            return
        lines = received[:end].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            method, target, _ = lines[0].split(" ", 2)
            length = int(headers.get("content-length", "0"))
        except ValueError:  # not HTTP/1.1 as the gateway writes it: nothing sensible to answer
            self._close(connection)
            return
        if "transfer-encoding" in headers:
            del received[:]
            connection.close_after = True
            self._schedule(connection, timeline(error_reply(501, "chunked bodies: not served")))
            return
        if len(received) < end + 4 + length:
            return
        body = bytes(received[end + 4 : end + 4 + length])
        del received[: end + 4 + length]
        connection.close_after = headers.get("connection", "").lower() == "close"
        mock = {name: value for name, value in headers.items() if name.startswith("x-mock-")}
        key = (method, target, body, *sorted(mock.items()))
        reply = self._replies.get(key)
        if reply is None:
            if len(self._replies) >= MAX_REPLIES:
                self._replies.clear()
            path = target.partition("?")[0]
            rendered = answer(
                Request(method, path, mock, body),
                self._options,
                now=time.time(),
                rng=random.Random(0),
            )
            if rendered.hang or rendered.drop_after is not None:
                rendered = error_reply(400, "x-mock-hang and x-mock-drop-after: the lean mock's")
            reply = self._replies[key] = timeline(rendered)
        self._schedule(connection, reply)

    def _schedule(self, connection: _Connection, reply: Timeline) -> None:
        connection.replying = True
        now = time.monotonic()
        last = len(reply) - 1
        for index, (at, data) in enumerate(reply):
            if at == 0.0:
                self._send(connection, data, index == last)
            else:
                entry = (now + at, next(self._order), connection, data, index == last)
                heapq.heappush(self._due, entry)

    def _send(self, connection: _Connection, data: bytes, last: bool) -> None:
        if connection.unsent:
            connection.unsent += data
        else:
            try:
                sent = connection.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(connection)
                return
            if sent < len(data):
                connection.unsent = data[sent:]
                self._selector.modify(
                    connection.sock,
                    selectors.EVENT_READ | selectors.EVENT_WRITE,
                    self._selector.get_key(connection.sock).data,
                )
        if last:
            connection.replying = False
            if connection.close_after:
                if not connection.unsent:
                    self._close(connection)
                return
            self._next_request(connection)  # one the client sent while this reply played

    def _flush(self, connection: _Connection) -> None:
        try:
            sent = connection.sock.send(connection.unsent)
        except BlockingIOError:
            return
        except OSError:
            self._close(connection)
            return
        connection.unsent = connection.unsent[sent:]
        if connection.unsent:
            return
        if connection.close_after and not connection.replying:
            self._close(connection)
            return
        key = self._selector.get_key(connection.sock)
        self._selector.modify(connection.sock, selectors.EVENT_READ, key.data)

    def _close(self, connection: _Connection) -> None:
        if connection.open:
            connection.open = False
            self._selector.unregister(connection.sock)
            connection.sock.close()


class _Stopped(Exception):
    """Raised by the signal handler out of the loop's `select`."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__)
    defaults = MockOptions()
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default=defaults.name)
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--token-delay", type=float, default=defaults.token_delay)
    parser.add_argument("--ttft", type=float, default=defaults.ttft)
    args = parser.parse_args(argv)
    raise_open_file_limit()
    options = MockOptions(
        tokens=args.tokens, token_delay=args.token_delay, ttft=args.ttft, name=args.name
    )
    listener = socket.create_server((args.host, args.port), backlog=socket.SOMAXCONN)
    backend = Backend(listener, options)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    host, port = listener.getsockname()[:2]
    print(f"mock {args.name} listening on http://{host}:{port}", flush=True)
    try:
        backend.run()
    except _Stopped:
        pass
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
