"""Stream framing: what kind of stream a response is, and how to end one with an error.

Invariant: an error written into a stream that already started always begins at a frame
boundary (an SSE event or an NDJSON line), so a client's parser sees the partial frame end and
an explicit error after it — never an error glued onto half an event, never a silent end.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping


class StreamKind(enum.Enum):
    SSE = "sse"
    NDJSON = "ndjson"
    OTHER = "other"


def stream_kind(headers: Iterable[tuple[bytes, bytes]]) -> StreamKind:
    """How a response body is framed. A body with a Content-Length cannot take an error frame
    after it started, so it counts as OTHER whatever its media type."""
    media = b""
    for name, value in headers:
        if name == b"content-length":
            return StreamKind.OTHER
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
    if media == b"text/event-stream":
        return StreamKind.SSE
    if media in (b"application/x-ndjson", b"application/jsonl"):
        return StreamKind.NDJSON
    return StreamKind.OTHER


def stream_error_frame(
    kind: StreamKind, tail: bytes, payload: Mapping[str, object]
) -> bytes | None:
    """Bytes that end a started stream with an error, given the last bytes already sent.

    None for streams with no framing of their own: those can only be aborted.
    """
    data = json.dumps(payload).encode()
    if kind is StreamKind.SSE:
        if not tail or tail.endswith((b"\n\n", b"\r\n\r\n")):
            boundary = b""
        else:
            boundary = b"\n" if tail.endswith(b"\n") else b"\n\n"
        return boundary + b"event: error\ndata: " + data + b"\n\n"
    if kind is StreamKind.NDJSON:
        boundary = b"" if tail.endswith(b"\n") or not tail else b"\n"
        return boundary + data + b"\n"
    return None
