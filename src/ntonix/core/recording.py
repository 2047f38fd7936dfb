"""Recording a response body as the chunks it was made of, so a cache hit replays its framing.

Invariants: whatever the network splits, the frames `FrameSplitter` returns join back to exactly
the bytes fed, and each SSE frame ends at an event boundary (a blank line, whichever of CRLF, LF
or CR ends its lines) and each NDJSON frame at a newline; only the bytes after the last
boundary are held back, and `flush` hands them over. A `StreamRecorder` never holds more than
its byte budget, and says `complete` only for a body that ended normally with no error in it.
"""

from __future__ import annotations

import json

from ntonix.core.framing import StreamKind

_CR = 0x0D
_LF = 0x0A


class FrameSplitter:
    """Re-splits a body arriving in arbitrary pieces into frames: SSE events, NDJSON lines, or
    (for other bodies) the whole body, handed over by `flush`."""

    def __init__(self, kind: StreamKind) -> None:
        self.kind = kind
        self._buffer = bytearray()
        self._line_start = 0  # where the current, unfinished line begins in the buffer
        self._scan_from = 0  # where to look for its end: everything before holds none

    def feed(self, data: bytes) -> list[bytes]:
        """The frames that `data` completes, in order."""
        self._buffer += data
        if self.kind is StreamKind.SSE:
            return self._sse_events(final=False)
        if self.kind is StreamKind.NDJSON:
            return self._ndjson_lines()
        return []

    def flush(self) -> list[bytes]:
        """The body ended: the frames still held, the last one possibly unfinished."""
        frames = self._sse_events(final=True) if self.kind is StreamKind.SSE else []
        if self._buffer:
            frames.append(bytes(self._buffer))
        self._buffer.clear()
        self._line_start = self._scan_from = 0
        return frames

    @property
    def pending(self) -> bytes:
        """Bytes fed but not yet part of a frame."""
        return bytes(self._buffer)

    def _ndjson_lines(self) -> list[bytes]:
        end = self._buffer.rfind(b"\n", self._scan_from)
        if end == -1:
            self._scan_from = len(self._buffer)
            return []
        lines = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scan_from = 0
        return [line + b"\n" for line in lines.split(b"\n")]

    def _sse_events(self, *, final: bool) -> list[bytes]:
        buffer = self._buffer
        events = []
        event_start = 0
        line_start, scan = self._line_start, self._scan_from
        while True:
            found = _line_end(buffer, scan, final=final)
            if found is None:
                break
            terminator, end = found
            if terminator == line_start:  # a blank line ends the event
                events.append(bytes(buffer[event_start:end]))
                event_start = end
            line_start = scan = end
        if scan < len(buffer):
            # No complete line ahead: a CR at the very end may still turn out to be CRLF.
            scan = len(buffer) - 1 if buffer[-1] == _CR else len(buffer)
        del buffer[:event_start]
        self._line_start, self._scan_from = line_start - event_start, scan - event_start
        return events


def _line_end(buffer: bytearray, start: int, *, final: bool) -> tuple[int, int] | None:
    """(where the terminator starts, where the line ends) of the first line ending at or after
    `start`, or None. A CR last in the buffer is only an ending when `final`."""
    lf = buffer.find(b"\n", start)
    cr = buffer.find(b"\r", start, len(buffer) if lf == -1 else lf)
    if cr == -1:
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 < len(buffer):
        return cr, cr + 2 if buffer[cr + 1] == _LF else cr + 1
    return (cr, cr + 1) if final else None


class StreamRecorder:
    """Records one response body as frames, within a byte budget.

    Feed it the body as it arrives, then call `finish` once the body ended normally. `complete`
    is True for an SSE stream that sent `data: [DONE]`, an NDJSON stream that sent a line with
    `"done": true`, or any other body once finished — and never after an error frame or once
    the budget is exceeded (`too_large`: everything recorded is dropped, later data ignored).
    """

    def __init__(self, kind: StreamKind, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (got {max_bytes})")
        self.kind = kind
        self.max_bytes = max_bytes
        self._splitter = FrameSplitter(kind)
        self._frames: list[bytes] = []
        self._size = 0
        self._ended = False  # saw the stream's own end marker
        self._failed = False  # saw an error frame
        self._finished = False
        self._too_large = False

    def feed(self, data: bytes) -> None:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._too_large:
            return
        self._size += len(data)
        if self._size > self.max_bytes:
            self._too_large = True
            self._frames.clear()
            self._splitter = FrameSplitter(self.kind)
            return
        self._take(self._splitter.feed(data))

    def finish(self) -> None:
        """The body ended normally (the upstream sent all of it)."""
        if self._finished:
            return
        self._finished = True
        if self._too_large:
            return
        self._take(self._splitter.flush())
        if self.kind is StreamKind.OTHER:
            self._ended = True

    def complete(self) -> bool:
        """Whether the recording is a whole, error-free response worth storing."""
        return self._ended and not self._failed and not self._too_large

    @property
    def too_large(self) -> bool:
        return self._too_large

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def chunks(self) -> tuple[bytes, ...]:
        """The frames recorded so far (empty once too large)."""
        return tuple(self._frames)

    def pending(self) -> bytes:
        """Bytes fed but not yet framed: `chunks()` joined plus these is everything fed."""
        return b"" if self._too_large else self._splitter.pending

    def _take(self, frames: list[bytes]) -> None:
        for frame in frames:
            if self.kind is StreamKind.SSE:
                self._inspect_sse(frame)
            elif self.kind is StreamKind.NDJSON:
                self._inspect_ndjson(frame)
        self._frames.extend(frames)

    def _inspect_sse(self, frame: bytes) -> None:
        if not _ends_event(frame):
            return  # an event cut short by the end of the body is not an event
        event = b""
        data = []
        for line in frame.splitlines():
            field, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if field == b"data":
                data.append(value)
            elif field == b"event":
                event = value
        if not data and not event:
            return
        payload = b"\n".join(data)
        if payload == b"[DONE]":
            self._ended = True
        elif event == b"error" or (b"error" in payload and _has_error(payload)):
            self._failed = True

    def _inspect_ndjson(self, frame: bytes) -> None:
        if b'"done"' not in frame and b'"error"' not in frame:
            return  # the common case, without parsing JSON
        try:
            line = json.loads(frame)
        except ValueError:
            return
        if not isinstance(line, dict):
            return
        if line.get("error") is not None:
            self._failed = True
        elif line.get("done") is True:
            self._ended = True


def _ends_event(frame: bytes) -> bool:
    """Whether an SSE frame ends with a blank line, i.e. is a whole event."""
    for terminator in (b"\r\n", b"\n", b"\r"):
        if frame.endswith(terminator):
            rest = frame[: -len(terminator)]
            return not rest or rest.endswith((b"\n", b"\r"))
    return False


def _has_error(payload: bytes) -> bool:
    """Whether an SSE data payload is a JSON object reporting an error (as vLLM sends mid-way)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("error") is not None
