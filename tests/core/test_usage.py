"""Token usage read from responses as they pass: reported counts, stripping, estimates."""

from __future__ import annotations

import json

import attrs
from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.framing import StreamKind
from ntonix.core.usage import (
    MAX_METERED_BODY,
    Usage,
    UsageMeter,
    prompt_estimate,
    prompt_estimate_of,
    reported_usage,
    with_stream_usage,
)


def sse(*messages: object) -> list[bytes]:
    return [b"data: " + json.dumps(m).encode() + b"\n\n" for m in messages] + [b"data: [DONE]\n\n"]


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, object]:
    delta = {} if content is None else {"content": content}
    return {
        "object": "chat.completion.chunk",
        "choices": [{"delta": delta, "finish_reason": finish}],
    }


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
STREAM = sse(chunk(""), chunk("a"), chunk("b"), chunk("c"), chunk(None, "stop"))
USAGE_EVENT = b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\n"
WITH_USAGE = [*STREAM[:-1], USAGE_EVENT, STREAM[-1]]
NDJSON = [
    b'{"message":{"content":"a"},"done":false}\n',
    b'{"message":{"content":"b"},"done":false}\n',
    b'{"message":{"content":""},"done":true,"prompt_eval_count":7,"eval_count":2}\n',
]


def meter_all(meter: UsageMeter, pieces: list[bytes]) -> bytes:
    return b"".join(meter.feed(piece) for piece in pieces) + meter.flush()


@attrs.frozen
class Case:
    name: str
    kind: StreamKind
    body: bytes
    strip: bool
    passed: bytes  # what the client gets
    usage: Usage


ASKED, PLAIN, LINES = b"".join(WITH_USAGE), b"".join(STREAM), b"".join(NDJSON)
CASES = [
    Case("sse, client asked", StreamKind.SSE, ASKED, False, ASKED, Usage(12, 3)),
    Case("sse, gateway asked", StreamKind.SSE, ASKED, True, PLAIN, Usage(12, 3)),
    Case("sse, none sent", StreamKind.SSE, PLAIN, True, PLAIN, Usage(5, 3, True)),
    Case("ndjson", StreamKind.NDJSON, LINES, False, LINES, Usage(7, 2)),
    Case(
        "json",
        StreamKind.OTHER,
        json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": USAGE}).encode(),
        True,
        json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": USAGE}).encode(),
        Usage(12, 3),
    ),
    Case(
        "ollama json, no counts",
        StreamKind.OTHER,
        b'{"response":"twelve chars","done":true}',
        False,
        b'{"response":"twelve chars","done":true}',
        Usage(5, 3, True),
    ),
]  # fmt: skip


@given(st.sampled_from(CASES), st.lists(st.integers(0, 400), max_size=6))
def test_counts_and_bytes_do_not_depend_on_how_the_network_splits(
    case: Case, cuts: list[int]
) -> None:
    bounds = sorted({min(cut, len(case.body)) for cut in cuts})
    pieces = [case.body[a:b] for a, b in zip([0, *bounds], [*bounds, len(case.body)], strict=True)]
    meter = UsageMeter(case.kind, strip=case.strip, prompt=lambda: 5)
    assert meter_all(meter, pieces) == case.passed
    assert meter.usage() == case.usage


def test_without_stripping_every_byte_passes_at_once() -> None:
    meter = UsageMeter(StreamKind.SSE, strip=False, prompt=lambda: 0)
    assert meter.feed(b'data: {"cho') == b'data: {"cho'


def test_a_client_that_leaves_mid_stream_gets_an_estimate_of_what_passed() -> None:
    meter = UsageMeter(StreamKind.SSE, strip=True, prompt=lambda: 9)
    for event in STREAM[:3]:  # the role chunk and two words
        meter.feed(event)
    assert meter.usage() == Usage(9, 2, estimated=True)


def test_a_body_too_large_to_parse_is_estimated_from_its_size() -> None:
    meter = UsageMeter(StreamKind.OTHER, strip=False, prompt=lambda: 1)
    meter.feed(b"x" * MAX_METERED_BODY)
    meter.feed(b"yyyy")
    meter.flush()
    assert meter.usage() == Usage(1, MAX_METERED_BODY // 4 + 1, estimated=True)


def test_reported_usage_reads_openai_responses_api_and_ollama_shapes() -> None:
    assert reported_usage({"usage": USAGE}) == (12, 3)
    assert reported_usage({"usage": {"input_tokens": 4, "output_tokens": 6}}) == (4, 6)
    assert reported_usage({"response": {"usage": {"input_tokens": 1, "output_tokens": 2}}}) == (
        1,
        2,
    )
    assert reported_usage({"done": True, "eval_count": 3}) == (0, 3)  # prompt cached: no count
    for nothing in ({"usage": None}, {"done": False}, [], {"usage": {"x": 1}}, {"eval_count": -1}):
        assert reported_usage(nothing) is None


def test_stream_usage_is_asked_for_only_where_the_client_did_not() -> None:
    chat = {"model": "m", "messages": [], "stream": True}
    asked = with_stream_usage(b"/v1/chat/completions", chat)
    assert asked is not None and json.loads(asked)["stream_options"] == {"include_usage": True}
    kept = {**chat, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}
    asked = with_stream_usage(b"/v1/completions", kept)
    assert asked is not None
    assert json.loads(asked)["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    assert with_stream_usage(b"/v1/chat/completions", {**chat, "stream": False}) is None
    has = {**chat, "stream_options": {"include_usage": True}}
    assert with_stream_usage(b"/v1/chat/completions", has) is None
    assert with_stream_usage(b"/api/chat", chat) is None
    assert with_stream_usage(b"/v1/chat/completions", {**chat, "stream_options": 3}) is None


def test_prompt_estimate_counts_message_text_at_four_characters_a_token() -> None:
    payload = {
        "model": "a-long-model-name-that-is-not-prompt",
        "messages": [
            {"role": "system", "content": "x" * 8},
            {"role": "user", "content": [{"type": "text", "text": "y" * 5}]},
        ],
    }
    assert prompt_estimate(payload) == 4  # 13 characters
    assert prompt_estimate({"prompt": "abcd"}) == 1
    assert prompt_estimate(None) == 0
    assert prompt_estimate_of(json.dumps(payload).encode()) == 4
    for not_an_object in (b"[1]", b"{", b""):
        assert prompt_estimate_of(not_an_object) == 0


def test_the_prompt_is_estimated_only_when_the_backend_reported_no_counts() -> None:
    asked = []

    def prompt() -> int:
        asked.append(1)
        return 7

    reported = UsageMeter(StreamKind.OTHER, strip=False, prompt=prompt)
    reported.feed(json.dumps({"choices": [], "usage": USAGE}).encode())
    reported.flush()
    assert reported.usage() == Usage(12, 3) and not asked
    silent = UsageMeter(StreamKind.OTHER, strip=False, prompt=prompt)
    silent.feed(b'{"choices": [{"message": {"content": "abcdefgh"}}]}')
    silent.flush()
    assert silent.usage() == Usage(7, 2, estimated=True) and asked == [1]
