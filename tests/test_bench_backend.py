"""`python -m bench.backend`, the cheap backend of the bench's scenario (i): the lean mock's
replies, framed and timed as the lean mock sends them, keep-alive, and a client that leaves
mid-stream (or sends no HTTP at all) costs nothing to the next one."""

from __future__ import annotations

import json
import time

import trio

from bench.backend import timeline
from bench.wire import ResponseParser, request_bytes
from mocks.answers import answer
from mocks.options import MockOptions
from mocks.replies import Chunk, Reply, Request
from tests.support import PYTHON, Spawn

LISTENING = rb"mock b listening on http://127\.0\.0\.1:(\d+)"
BODY = json.dumps({"model": "mock-llm", "messages": [{"role": "user", "content": "hi"}]})
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True})
TIMING = {"x-mock-ttft": "0.2", "x-mock-tokens": "3", "x-mock-token-delay": "0.1"}


def test_timeline_sends_the_head_with_the_first_chunk_and_groups_chunks_due_together() -> None:
    reply = Reply(
        status=200,
        headers=(("content-type", "text/event-stream"),),
        chunks=(Chunk(0.5, b"a"), Chunk(0.0, b"bc"), Chunk(0.25, b"d")),
    )
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    assert timeline(reply) == (
        (0.5, head + b"1\r\na\r\n2\r\nbc\r\n"),
        (0.75, b"1\r\nd\r\n0\r\n\r\n"),
    )


async def _read_response(stream: trio.SocketStream, parser: ResponseParser) -> tuple[bytes, float]:
    """The de-chunked body of one response, and when its first body byte came."""
    parser.start()
    body = b""
    first = 0.0
    while not parser.complete:
        data = await stream.receive_some(65536)
        assert data, "the backend closed the connection mid-response"
        chunk = parser.feed(data)
        if chunk and not body:
            first = time.monotonic()
        body += chunk
    return body, first


async def test_streams_the_mocks_reply_on_its_schedule_and_keeps_the_connection(
    spawn: Spawn,
) -> None:
    child = await spawn(PYTHON, "-m", "bench.backend", "--port", "0", "--name", "b")
    port = int((await child.wait_for(LISTENING)).group(1))
    expected = answer(
        Request("POST", "/v1/chat/completions", TIMING, STREAM_BODY.encode()),
        MockOptions(name="b"),
        now=time.time(),
        rng=__import__("random").Random(0),
    )
    events = b"".join(chunk.data for chunk in expected.chunks).split(b"\n\n")

    # A client that leaves mid-stream first: the backend must go on serving the next ones.
    gone = await trio.open_tcp_stream("127.0.0.1", port)
    await gone.send_all(
        request_bytes("POST", "/v1/chat/completions", "b", TIMING, STREAM_BODY.encode())
    )
    await gone.aclose()

    # Then one that sends no HTTP at all: closed, and the backend serves on.
    bad = await trio.open_tcp_stream("127.0.0.1", port)
    await bad.send_all(b"not http\r\ncontent-length: x\r\n\r\n")
    with trio.fail_after(5):
        assert await bad.receive_some(65536) == b""
    await bad.aclose()

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    parser = ResponseParser()
    for _ in range(2):  # twice on one connection: kept alive
        sent = time.monotonic()
        request = request_bytes("POST", "/v1/chat/completions", "b", TIMING, STREAM_BODY.encode())
        await stream.send_all(request)
        body, first = await _read_response(stream, parser)
        done = time.monotonic()
        assert parser.status == 200
        # The same events as the mock's (ids and words from the same seed), in the same shape.
        assert [event[:40] for event in body.split(b"\n\n")] == [e[:40] for e in events]
        assert first - sent >= 0.2  # the time to first token
        assert done - sent >= 0.2 + 2 * 0.1  # then two more tokens 0.1 s apart
    await stream.send_all(request_bytes("POST", "/v1/chat/completions", "b", {}, BODY.encode()))
    body, _ = await _read_response(stream, parser)
    assert json.loads(body)["object"] == "chat.completion"
    await stream.aclose()
