"""HTTP/1.1 towards a backend, sans I/O: the request written, the response parsed by llhttp.

llhttp (through httptools) parses a response in C: about 4 µs per exchange here, where h11 took
70-90 µs (docs/BENCHMARKS.md, issue 11), and a stream's chunks pass through it for a fraction
of h11's cost too. What h11 did beyond parsing is done here:
- the request head is written from validated parts: a method and a header name are tokens, a
  target and a header value hold no control characters (no CR, LF or NUL can split a request);
- a response head is bounded (`max_head` bytes, also while it is incomplete: llhttp sets no
  limit), interim 1xx responses are skipped, 101 is an error (nobody asked to upgrade);
- a body delimited by the connection's close ends at EOF; any other body cut by EOF is an error;
  a Transfer-Encoding whose last coding is not chunked is refused at the head;
- the response to a HEAD request has no body, whatever its Content-Length says;
- a connection is reusable only after a complete response that keeps it alive and nothing after.

llhttp refuses what h11 refused in a response: a malformed status line, Content-Length with
Transfer-Encoding, conflicting Content-Lengths, a bad chunk size, bytes after a `Connection:
close` response, obs-fold lines. Every refusal is a `ResponseError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import httptools

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
# RFC 9110 field-value: visible characters (and obs-text) with single spaces or tabs between.
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")


class ResponseError(Exception):
    """The backend's response is not valid HTTP/1.1 (or not one the gateway takes)."""


class RequestError(ValueError):
    """A request part that cannot be written safely: a bug upstream of this module."""


def request_head(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers, validated; the caller supplies Host and the framing."""
    if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
        raise RequestError(f"invalid request line: {method!r} {target!r}")
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise RequestError(f"invalid header {name!r}")
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class ResponseReader:
    """Feeds one response's bytes to llhttp; says what arrived: the head, body bytes, the end.

    One reader per exchange: `reusable()` says whether the connection may carry the next one.
    """

    __slots__ = (
        "_by_close",
        "_extra",
        "_failure",
        "_head_bytes",
        "_head_size",
        "_headers",
        "_is_head",
        "_max_head",
        "_parser",
        "body",
        "complete",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, *, max_head: int, head_request: bool = False) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._max_head = max_head
        self._is_head = head_request
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_bytes = 0  # fed while no final head was complete
        self._by_close = False  # the body ends when the connection closes
        self._extra = False  # bytes came after the response
        self._failure: ResponseError | None = None  # the body's fault, raised once it is reached
        self.status = 0  # of the final response, once its head is complete
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []  # arrived and not yet taken
        self.complete = False
        self.keep_alive = False

    def feed(self, data: bytes) -> None:
        """Bytes from the backend; b"" for its EOF. Raises ResponseError."""
        if self.complete:
            self._extra = self._extra or bool(data)
            return
        if not data:
            self._eof()
            return
        if not self.status:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise ResponseError("the backend switched protocols unasked") from None
        except (httptools.HttpParserError, httptools.HttpParserCallbackError) as error:
            failure = error.__context__
            if not isinstance(failure, ResponseError):
                failure = ResponseError(str(error) or type(error).__name__)
            if self.complete:
                self._extra = True  # junk after a complete response: not reused
            elif self.status:
                # The body went wrong: what arrived before the fault still goes out first
                # (llhttp parses a whole read at once; the fault is the body's, not the head's).
                self._failure = failure
            else:
                raise failure from None
        if not self.status and self._head_bytes > self._max_head:
            raise ResponseError(f"response head over {self._max_head} bytes")

    def take(self) -> tuple[bytes, bool] | None:
        """The body bytes that arrived and whether the body is complete; None when more must
        be read first. Raises the body's ResponseError once the bytes before it are taken."""
        parts = self.body
        if parts:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            return data, self.complete
        if self.complete:
            return b"", True
        if self._failure is not None:
            raise self._failure
        return None

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self._extra

    def close(self) -> None:
        """Done with: drops the parser, which holds this reader's methods as its callbacks, so
        that both are freed at once rather than left to the garbage collector as a cycle.
        Nothing may be fed after."""
        del self._parser

    def _eof(self) -> None:
        if self.status and self._by_close:
            self.complete = True
            self.keep_alive = False
            return
        if self.status:
            raise ResponseError("connection closed in the middle of the body")
        raise ResponseError("connection closed before a response")

    # llhttp's callbacks (httptools calls them by these names).

    def on_message_begin(self) -> None:
        if self.status:  # a second response began in the bytes after the first
            self._extra = True
        self._headers = []
        self._head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._max_head:
            raise ResponseError(f"response head over {self._max_head} bytes")
        self._headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # interim: llhttp ends it here and parses the next response
            return
        codings = [v for n, v in self._headers if n == b"transfer-encoding"]
        if codings and not b",".join(codings).rstrip().lower().endswith(b"chunked"):
            # llhttp would read such a body until the close; h11 refused it, and so do we.
            raise ResponseError("a Transfer-Encoding other than chunked")
        framed = codings or any(n == b"content-length" for n, _ in self._headers)
        self._by_close = not framed and status not in (204, 304)
        self.status = status
        self.headers = self._headers
        self.keep_alive = self._parser.should_keep_alive()
        if self._is_head:
            # No body follows, whatever the head announced; llhttp would wait for one.
            self.complete = True
            self.keep_alive = False

    def on_body(self, data: bytes) -> None:
        if not self.complete:
            self.body.append(data)

    def on_message_complete(self) -> None:
        if self.status and not self.complete:
            self.complete = True
