import itertools
import json

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.framing import StreamKind
from ntonix.core.recording import FrameSplitter, StreamRecorder


def _split_feed(kind: StreamKind, pieces: list[bytes]) -> list[bytes]:
    splitter = FrameSplitter(kind)
    frames = [frame for piece in pieces for frame in splitter.feed(piece)]
    return frames + splitter.flush()


def _splits(data: bytes) -> list[list[bytes]]:
    """`data` cut once at every offset, and cut into single bytes."""
    cuts = [[data[:i], data[i:]] for i in range(len(data) + 1)]
    return [*cuts, [data[i : i + 1] for i in range(len(data))]]


def _two_cuts(data: bytes) -> list[list[bytes]]:
    """`data` cut twice, at every pair of offsets."""
    n = len(data)
    return [[data[:i], data[i:j], data[j:]] for i in range(n + 1) for j in range(i, n + 1)]


@attrs.frozen
class Framing:
    name: str
    kind: StreamKind
    frames: tuple[bytes, ...]  # what the splitter must return, whole input = their join


FRAMINGS = [
    Framing(
        "sse lf",
        StreamKind.SSE,
        (b'data: {"a":1}\n\n', b"data: [DONE]\n\n"),
    ),
    Framing(
        "sse crlf",
        StreamKind.SSE,
        (b'data: {"a":1}\r\n\r\n', b"event: x\r\ndata: y\r\n\r\n", b"data: [DONE]\r\n\r\n"),
    ),
    Framing("sse cr", StreamKind.SSE, (b"data: a\r\r", b"data: b\r\r")),
    Framing(
        "sse mixed endings",
        StreamKind.SSE,
        (b"data: a\r\n\n", b"data: b\n\r\n", b"data: c\n\r", b"data: d\r\r\n"),
    ),
    Framing(
        "sse comments, fields and multi-line data",
        StreamKind.SSE,
        (b": ping\n\n", b"id: 1\nevent: message\ndata: a\ndata: b\n\n", b"retry: 5\n\n"),
    ),
    Framing("sse blank lines alone", StreamKind.SSE, (b"\n", b"\r\n", b"data: x\n\n")),
    Framing(
        "sse ends mid-event",
        StreamKind.SSE,
        (b"data: a\n\n", b"data: [DONE]\n"),
    ),
    Framing(
        "ndjson",
        StreamKind.NDJSON,
        (b'{"done":false}\n', b"\n", b'{"done":true}\r\n'),
    ),
    Framing("ndjson unterminated last line", StreamKind.NDJSON, (b'{"a":1}\n', b'{"done":true}')),
    Framing("other", StreamKind.OTHER, (b'{"choices": []}\n\n{"x": 1}',)),
]


@pytest.mark.parametrize("case", FRAMINGS, ids=lambda case: case.name)
def test_frames_do_not_depend_on_network_splits(case: Framing) -> None:
    data = b"".join(case.frames)
    for pieces in [*_splits(data), *_two_cuts(data)]:
        assert _split_feed(case.kind, pieces) == list(case.frames), pieces


def test_empty_body_has_no_frames() -> None:
    for kind in StreamKind:
        assert _split_feed(kind, [b"", b""]) == []


def test_feed_returns_each_event_as_soon_as_it_is_whole() -> None:
    splitter = FrameSplitter(StreamKind.SSE)
    assert splitter.feed(b"data: a\n") == []
    assert splitter.pending == b"data: a\n"
    assert splitter.feed(b"\ndata: b\n\ndata: c") == [b"data: a\n\n", b"data: b\n\n"]
    assert splitter.pending == b"data: c"
    # A CR last may be the start of a CRLF: the event is not whole until the next byte says so.
    assert splitter.feed(b"\r\n\r") == []
    assert splitter.feed(b"\n") == [b"data: c\r\n\r\n"]
    assert splitter.pending == b""


def test_other_bodies_are_one_frame_given_at_flush() -> None:
    splitter = FrameSplitter(StreamKind.OTHER)
    assert splitter.feed(b"data: a\n\n") == []
    assert splitter.feed(b"{}\n") == []
    assert splitter.flush() == [b"data: a\n\n{}\n"]


line_bodies = st.binary(max_size=6).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
sse_terminators = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_events(draw: st.DrawFn) -> bytes:
    """One event: non-empty lines, each with its own terminator, then a blank line (so events
    never start with a line end, and only the blank line can follow a CR)."""
    lines = draw(st.lists(line_bodies.filter(bool), min_size=1, max_size=3))
    event = b"".join(line + draw(sse_terminators) for line in lines)
    blank = draw(sse_terminators)
    # "\r" then "\n" would be one CRLF, not two line ends: no stream can mean both.
    if event.endswith(b"\r") and blank.startswith(b"\n"):
        blank = b"\r"
    return event + blank


sse_streams = st.lists(sse_events(), max_size=5)


def _random_split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(sse_streams, st.lists(st.integers(0, 200), max_size=8))
def test_sse_frames_are_the_events_whatever_the_splits(
    events: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(events)
    assert _split_feed(StreamKind.SSE, _random_split(data, cuts)) == events


@given(
    st.lists(st.binary(max_size=8).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=6),
    st.binary(max_size=5).map(lambda b: b.replace(b"\n", b"")),
    st.lists(st.integers(0, 100), max_size=8),
)
def test_ndjson_frames_are_the_lines_whatever_the_splits(
    lines: list[bytes], tail: bytes, cuts: list[int]
) -> None:
    data = b"".join(lines) + tail
    expected = lines + ([tail] if tail else [])
    assert _split_feed(StreamKind.NDJSON, _random_split(data, cuts)) == expected


# -- StreamRecorder ------------------------------------------------------------------------------

SSE_DONE = (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n")
NDJSON_DONE = (
    b'{"message":{"content":"hi"},"done":false}\n',
    b'{"message":{"content":""},"done":true,"done_reason":"stop"}\n',
)


@attrs.frozen
class Recording:
    name: str
    kind: StreamKind
    body: bytes
    complete: bool
    finish: bool = True


RECORDINGS = [
    Recording("sse done", StreamKind.SSE, b"".join(SSE_DONE), True),
    Recording("sse done, crlf", StreamKind.SSE, b"data: x\r\n\r\ndata: [DONE]\r\n\r\n", True),
    Recording("sse done without the space", StreamKind.SSE, b"data:[DONE]\n\n", True),
    Recording("sse done before the body ended", StreamKind.SSE, b"".join(SSE_DONE), True, False),
    Recording("sse cut before done", StreamKind.SSE, SSE_DONE[0], False),
    Recording("sse done never finished its event", StreamKind.SSE, b"data: [DONE]\n", False),
    Recording("sse done is not a prefix", StreamKind.SSE, b"data: [DONE]x\n\n", False),
    Recording(
        "sse error event",
        StreamKind.SSE,
        SSE_DONE[0] + b'event: error\ndata: {"error": {"message": "x"}}\n\n' + SSE_DONE[1],
        False,
    ),
    Recording(
        "sse error object, as vLLM sends",
        StreamKind.SSE,
        b'data: {"error": {"message": "x", "code": 500}}\n\n' + SSE_DONE[1],
        False,
    ),
    Recording(
        "sse content mentioning errors is fine",
        StreamKind.SSE,
        b'data: {"choices":[{"delta":{"content":"error"}}],"error":null}\n\n' + SSE_DONE[1],
        True,
    ),
    Recording("ndjson done", StreamKind.NDJSON, b"".join(NDJSON_DONE), True),
    Recording("ndjson done, crlf", StreamKind.NDJSON, b'{"done": true}\r\n', True),
    Recording("ndjson done, no final newline", StreamKind.NDJSON, b'{"done":true}', True),
    Recording("ndjson cut before done", StreamKind.NDJSON, NDJSON_DONE[0], False),
    Recording("ndjson done must be true", StreamKind.NDJSON, b'{"done":"true"}\n', False),
    Recording(
        "ndjson error line",
        StreamKind.NDJSON,
        b'{"error":"model crashed"}\n' + NDJSON_DONE[1],
        False,
    ),
    Recording("ndjson garbage", StreamKind.NDJSON, b'not json "done"\n', False),
    Recording("other, finished", StreamKind.OTHER, b'{"choices": []}', True),
    Recording("other, not finished", StreamKind.OTHER, b'{"choices": []}', False, False),
]


@pytest.mark.parametrize("case", RECORDINGS, ids=lambda case: case.name)
def test_recorder_completion(case: Recording) -> None:
    for pieces in _splits(case.body):
        recorder = StreamRecorder(case.kind, max_bytes=10_000)
        for piece in pieces:
            recorder.feed(piece)
        if case.finish:
            recorder.finish()
        assert recorder.complete() is case.complete, pieces
        assert b"".join(recorder.chunks()) + recorder.pending() == case.body
        assert recorder.size == len(case.body)


def test_recorder_keeps_the_events_as_they_were() -> None:
    recorder = StreamRecorder(StreamKind.SSE, max_bytes=10_000)
    for piece in [SSE_DONE[0][:5], SSE_DONE[0][5:] + SSE_DONE[1][:3], SSE_DONE[1][3:]]:
        recorder.feed(piece)
    recorder.finish()
    assert recorder.chunks() == SSE_DONE


def test_recorder_keeps_ndjson_lines_as_they_were() -> None:
    recorder = StreamRecorder(StreamKind.NDJSON, max_bytes=10_000)
    recorder.feed(b"".join(NDJSON_DONE))
    recorder.finish()
    assert recorder.chunks() == NDJSON_DONE
    assert json.loads(recorder.chunks()[-1])["done"] is True


def test_recorder_stops_past_its_budget() -> None:
    body = b"".join(SSE_DONE)
    exact = StreamRecorder(StreamKind.SSE, max_bytes=len(body))
    exact.feed(body)
    assert exact.complete()
    assert not exact.too_large

    recorder = StreamRecorder(StreamKind.SSE, max_bytes=len(body) - 1)
    recorder.feed(SSE_DONE[0])
    assert recorder.chunks() == SSE_DONE[:1]
    recorder.feed(SSE_DONE[1])
    assert recorder.too_large
    assert recorder.chunks() == ()
    assert recorder.pending() == b""
    recorder.feed(b"data: more\n\n")  # ignored, not held
    recorder.finish()
    assert not recorder.complete()
    assert recorder.chunks() == ()


def test_other_bodies_past_the_budget_are_not_complete() -> None:
    recorder = StreamRecorder(StreamKind.OTHER, max_bytes=4)
    recorder.feed(b"12345")
    recorder.finish()
    assert recorder.too_large
    assert not recorder.complete()


def test_feeding_a_finished_recorder_is_an_error() -> None:
    recorder = StreamRecorder(StreamKind.NDJSON, max_bytes=100)
    recorder.finish()
    recorder.finish()  # idempotent
    with pytest.raises(RuntimeError):
        recorder.feed(b"{}\n")


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        StreamRecorder(StreamKind.SSE, max_bytes=-1)
