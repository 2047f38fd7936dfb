"""The upstream HTTP/1.1 codec (http1.py), sans I/O: every response fed whole and split at every
byte offset must read the same; what h11 refused is refused."""

from __future__ import annotations

import gc

import pytest

from ntonix.http1 import RequestError, ResponseError, ResponseReader, request_head

EVENT = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
SSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"x-pad:  spaced  \r\n\r\n" + b"%x\r\n%s\r\n" % (len(EVENT), EVENT) * 2 + b"0\r\n\r\n"
)
JSON = b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\n{}"
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n" + JSON
CLOSE_DELIMITED = b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end"


def _read(pieces: list[bytes], *, head_request: bool = False) -> tuple[ResponseReader, bytes]:
    """The reader after `pieces`, and the body bytes it gave."""
    reader = ResponseReader(max_head=1024, head_request=head_request)
    body = b""
    for piece in pieces:
        reader.feed(piece)
        while (arrived := reader.take()) is not None:
            body += arrived[0]
            if arrived[1]:
                break
    return reader, body


def _splits(data: bytes) -> list[list[bytes]]:
    return [[data]] + [[data[:at], data[at:]] for at in range(1, len(data))]


@pytest.mark.parametrize(
    ("response", "status", "body", "reusable"),
    [
        (SSE, 200, EVENT * 2, True),
        (JSON, 429, b"{}", True),
        (INTERIM, 429, b"{}", True),
        (JSON.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n"), 429, b"{}", False),
    ],
)
def test_a_response_reads_the_same_however_it_is_split(
    response: bytes, status: int, body: bytes, reusable: bool
) -> None:
    for pieces in _splits(response):
        reader, got = _read(pieces)
        assert (reader.status, got, reader.complete) == (status, body, True)
        assert reader.reusable() is reusable
    headers = _read([response])[0].headers
    assert all(name == name.lower() for name, _ in headers)
    if response is SSE:
        assert (b"x-pad", b"spaced") in headers


def test_a_body_without_length_ends_with_the_connection() -> None:
    reader, got = _read([CLOSE_DELIMITED])
    assert (got, reader.complete) == (b"until the end", False)
    reader.feed(b"")
    assert (reader.take(), reader.reusable()) == ((b"", True), False)


def test_the_answer_to_head_has_no_body_and_ends_its_connection() -> None:
    reader, _ = _read([JSON[: JSON.index(b"{}")]], head_request=True)
    assert (reader.status, reader.complete, reader.reusable()) == (429, True, False)


def test_bytes_after_a_response_keep_its_connection_from_reuse() -> None:
    assert not _read([JSON + b"HTTP/1.1 200 OK\r\n"])[0].reusable()
    assert not _read([JSON, b"junk"])[0].reusable()


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 two hundred OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-folded: a\r\n b\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-huge: " + b"a" * 2000 + b"\r\n\r\n",
    ],
)
def test_a_head_h11_refused_is_refused(response: bytes) -> None:
    with pytest.raises(ResponseError):
        _read([response])


def test_an_endless_incomplete_head_is_refused_past_the_limit() -> None:
    reader = ResponseReader(max_head=1024)
    reader.feed(b"HTTP/1.1 200 OK\r\nx-slow: ")
    with pytest.raises(ResponseError, match="over 1024"):
        for _ in range(100):
            reader.feed(b"a" * 64)


def test_a_broken_body_gives_what_came_before_it_then_the_error() -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    reader = ResponseReader(max_head=1024)
    reader.feed(head + b"%x\r\n%s\r\nzz\r\n" % (len(EVENT), EVENT))
    assert reader.status == 200
    assert reader.take() == (EVENT, False)
    with pytest.raises(ResponseError):
        reader.take()


@pytest.mark.parametrize("cut", [b"HTTP/1.1 200 OK\r\n", JSON[:-1], SSE[:-5]])
def test_a_response_cut_by_the_close_is_an_error(cut: bytes) -> None:
    reader = ResponseReader(max_head=1024)
    reader.feed(cut)
    with pytest.raises(ResponseError, match="closed"):
        reader.feed(b"")


def test_a_closed_reader_is_freed_without_the_garbage_collector() -> None:
    # Its parser holds the reader's methods: without `close` the two were a reference cycle,
    # left to the collector, for every response a backend sent.
    gc.collect()
    gc.disable()
    try:
        reader = ResponseReader(max_head=1024)
        reader.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        assert reader.take() == (b"ok", True)
        reader.close()
        del reader
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_request_head_is_written_from_valid_parts_only() -> None:
    head = request_head(b"POST", b"/v1/chat?x=1", [(b"host", b"a:1"), (b"x-t", b"a b\tc")])
    assert head == b"POST /v1/chat?x=1 HTTP/1.1\r\nhost: a:1\r\nx-t: a b\tc\r\n\r\n"
    for method, target, headers in [
        (b"POST", b"/v1/a b", []),
        (b"PO ST", b"/v1/a", []),
        (b"POST", b"/v1/a", [(b"x", b"a\r\nx-smuggled: 1")]),
        (b"POST", b"/v1/a", [(b"x", b"a\x00")]),
        (b"POST", b"/v1/a", [(b"x y", b"a")]),
        (b"POST", b"/v1/a", [(b"x", b" leading")]),
    ]:
        with pytest.raises(RequestError):
            request_head(method, target, headers)
