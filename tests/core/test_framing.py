import json

import pytest

from ntonix.core.framing import StreamKind, stream_error_frame, stream_kind

PAYLOAD = {"error": {"message": "boom", "type": "server_error", "code": "x"}}


@pytest.mark.parametrize(
    ("headers", "kind"),
    [
        ([(b"content-type", b"text/event-stream; charset=utf-8")], StreamKind.SSE),
        ([(b"content-type", b"Text/Event-Stream")], StreamKind.SSE),
        ([(b"content-type", b"application/x-ndjson")], StreamKind.NDJSON),
        ([(b"content-type", b"application/json")], StreamKind.OTHER),
        ([], StreamKind.OTHER),
        # A declared length leaves no room for an error frame after the body started.
        ([(b"content-type", b"text/event-stream"), (b"content-length", b"10")], StreamKind.OTHER),
    ],
)
def test_stream_kind(headers: list[tuple[bytes, bytes]], kind: StreamKind) -> None:
    assert stream_kind(headers) is kind


@pytest.mark.parametrize("tail", [b"", b"data: {}\n\n", b'data: {"partial', b"data: x\n"])
def test_sse_error_frame_starts_a_fresh_event(tail: bytes) -> None:
    frame = stream_error_frame(StreamKind.SSE, tail, PAYLOAD)
    assert frame is not None
    events = (tail + frame).split(b"\n\n")
    assert events[-1] == b""
    last = events[-2]
    assert last == b"event: error\ndata: " + json.dumps(PAYLOAD).encode()


@pytest.mark.parametrize("tail", [b"", b'{"done": false}\n', b'{"done": fal'])
def test_ndjson_error_frame_is_its_own_line(tail: bytes) -> None:
    frame = stream_error_frame(StreamKind.NDJSON, tail, PAYLOAD)
    assert frame is not None
    lines = (tail + frame).split(b"\n")
    assert lines[-1] == b""
    assert json.loads(lines[-2]) == PAYLOAD


def test_unframed_body_cannot_take_an_error_frame() -> None:
    assert stream_error_frame(StreamKind.OTHER, b"{", PAYLOAD) is None
