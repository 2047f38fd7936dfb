"""Hand-written HTTP/1.1 for the load generator: request bytes out, response framing in.

Why not h11: the load generator has to outrun the gateway several times over on a 2-core machine
that also runs the gateway and the mocks, and h11's event machinery costs more Python per
response than everything else the client does. This parser understands only what the mocks and
the gateway send: a status line, headers, then a content-length or a chunked body.

Invariants: `feed` returns exactly the body bytes (de-chunked) that the fed data completed; bytes
after the end of a response stay buffered for the next one; anything it cannot frame raises
`WireError` rather than guessing.
"""

from __future__ import annotations

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _DONE = range(7)


class WireError(Exception):
    """A response this parser cannot frame: the connection must not be reused."""


def request_bytes(method: str, path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    """One complete HTTP/1.1 request with a content-length body."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ResponseParser:
    """Feed it socket bytes; it tracks the head, the body framing and the end of a response."""

    __slots__ = ("_buffer", "_remaining", "_state", "complete", "keep_alive", "status")

    def __init__(self) -> None:
        self._buffer = b""
        self.start()

    def start(self) -> None:
        """Expect the next response on the same connection."""
        self.status = 0
        self.keep_alive = True
        self.complete = False
        self._state = _HEAD
        self._remaining = 0

    @property
    def head_complete(self) -> bool:
        return self._state != _HEAD

    def feed(self, data: bytes) -> bytes:
        """Take bytes read from the socket; return the body bytes they completed (maybe b"")."""
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        pos = 0
        end = len(buffer)
        while pos < end or self._state == _DONE:
            state = self._state
            if state == _HEAD:
                stop = buffer.find(b"\r\n\r\n", pos)
                if stop < 0:
                    break
                self._parse_head(buffer[pos:stop])
                pos = stop + 4
            elif state in (_LENGTH, _CHUNK_DATA):
                take = min(self._remaining, end - pos)
                out.append(buffer[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._state = _DONE if state == _LENGTH else _CHUNK_END
            elif state == _CHUNK_SIZE:
                stop = buffer.find(b"\r\n", pos)
                if stop < 0:
                    break
                try:
                    size = int(buffer[pos:stop].split(b";", 1)[0], 16)
                except ValueError:
                    raise WireError(f"bad chunk size {buffer[pos:stop]!r}") from None
                pos = stop + 2
                self._remaining = size
                self._state = _CHUNK_DATA if size else _TRAILER
            elif state == _CHUNK_END:
                if end - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise WireError("chunk not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                stop = buffer.find(b"\r\n", pos)
                if stop < 0:
                    break
                empty = stop == pos
                pos = stop + 2
                if empty:
                    self._state = _DONE
            else:  # _DONE: the rest belongs to the next response
                self.complete = True
                break
        self._buffer = buffer[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise WireError(f"bad status line {lines[0]!r}")
        self.status = int(status_line[1])
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.strip().lower() == b"chunked"
            elif name == b"connection":
                self.keep_alive = value.strip().lower() != b"close"
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH if length else _DONE
        else:
            # A body delimited by the close is legal but neither the mocks nor the gateway send
            # one; reading to EOF would also hide a truncated response.
            raise WireError("response has neither content-length nor chunked encoding")
