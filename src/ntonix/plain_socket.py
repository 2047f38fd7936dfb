"""Reading and writing a plain (non-TLS) socket without Trio's extra schedule points.

Trio's `send_all` and `receive_some` each reach a schedule point even when the kernel could
answer at once. On the hot path (a response's head and body towards the client, a request and
its answer towards a backend) those points were a large share of a request's task steps
(docs/BENCHMARKS.md, "Fourth round"). These helpers do the system call directly and leave
waiting to the caller: `write_now` and `read_now` never wait, `read_when_readable` waits only for
readiness.

Invariant: a socket we closed raises `trio.ClosedResourceError`, as Trio's own calls do.
"""

from __future__ import annotations

import os

import trio


def write_now(sock: trio.socket.SocketType, data: bytes | memoryview) -> int:
    """Bytes of `data` written to `sock` without waiting: 0 when its buffer is full. OSError
    for a socket the peer reset."""
    fd = sock.fileno()
    if fd == -1:
        raise trio.ClosedResourceError("the socket was closed")
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


def read_now(sock: trio.socket.SocketType, size: int) -> bytes:
    """What has arrived on `sock`, at most `size` bytes, without waiting: b"" when nothing has
    (or the peer closed or reset it: the next read, a waiting one, finds out again)."""
    try:
        return os.read(sock.fileno(), size)
    except OSError:  # BlockingIOError, or a reset (the next read then finds the end)
        return b""


async def read_when_readable(sock: trio.socket.SocketType, size: int) -> bytes:
    """What arrives next on `sock`, at most `size` bytes (b"" at its end). It waits first and
    reads after: for an answer not yet sent, Trio's try-then-wait paid a read that found
    nothing."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        fd = sock.fileno()
        if fd == -1:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            return os.read(fd, size)
        except BlockingIOError:
            continue
