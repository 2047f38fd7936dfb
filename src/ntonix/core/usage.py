"""Token usage of a response: what the backend reported, or else an estimate.

Invariants: `UsageMeter.feed` returns the bytes it is fed, in order and unchanged, but for the
usage-only event of an OpenAI stream when it was told to strip it (the gateway asked for usage
the client did not ask for): that event is left out whole. While stripping it holds back at
most the unfinished event at the end, which `flush` hands over; otherwise it holds nothing
back. A count the backend reported always wins over an estimate, and an estimate says so.

Where the numbers come from: OpenAI `usage` (`prompt_tokens`/`completion_tokens`, or the
Responses API's `input_tokens`/`output_tokens`) in a JSON body or in the last events of an SSE
stream; Ollama `prompt_eval_count`/`eval_count` in its JSON body or the `done` line of its
NDJSON stream. Without them: each content chunk of a stream is one completion token, and text
in a whole body or a prompt is one token per `CHARS_PER_TOKEN` characters. The prompt is
estimated only when a count is missing: most backends report theirs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ntonix.core.framing import StreamKind
from ntonix.core.recording import FrameSplitter

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text and BPE tokenizers
MAX_METERED_BODY = 8 * 1024 * 1024  # a whole body larger than this is estimated, not parsed
# Routes whose streams take `stream_options.include_usage` (OpenAI's own).
STREAM_USAGE_ROUTES = frozenset({b"/v1/chat/completions", b"/v1/completions"})

# A frame that carries generated text: a non-empty "content", "text" or "response" string.
_CONTENT = re.compile(rb'"(?:content|text|response)"\s*:\s*"(?!")')
_PROMPT_KEYS = frozenset({"messages", "prompt", "input", "system", "content", "text"})
_ANSWER_KEYS = frozenset({"choices", "message", "content", "text", "response", "output"})


@attrs.frozen
class Usage:
    prompt: int
    completion: int
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def reported_usage(message: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens a response object reports, or None when it has no counts."""
    if not isinstance(message, Mapping):
        return None
    usage = message.get("usage")
    if not isinstance(usage, Mapping) and isinstance(message.get("response"), Mapping):
        usage = message["response"].get("usage")  # the Responses API's response.completed
    if isinstance(usage, Mapping):
        return _pair(
            usage.get("prompt_tokens", usage.get("input_tokens")),
            usage.get("completion_tokens", usage.get("output_tokens")),
        )
    if message.get("done") is True or "eval_count" in message:
        return _pair(message.get("prompt_eval_count"), message.get("eval_count"))
    return None


def _pair(prompt: object, completion: object) -> tuple[int, int] | None:
    """Counts where at least one is a count (Ollama leaves out a prompt it had cached)."""
    counts = [
        value if type(value) is int and value >= 0 else None for value in (prompt, completion)
    ]
    if counts == [None, None]:
        return None
    return counts[0] or 0, counts[1] or 0


def estimate_tokens(characters: int) -> int:
    return math.ceil(characters / CHARS_PER_TOKEN)


def text_length(value: object, keys: frozenset[str]) -> int:
    """Characters of the strings found under `keys`, at any depth."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_length(item, keys) for item in value)
    if isinstance(value, Mapping):
        return sum(
            len(item) if isinstance(item, str) else text_length(item, keys)
            for key, item in value.items()
            if key in keys
        )
    return 0


def prompt_estimate(payload: Mapping[str, Any] | None) -> int:
    """Tokens the prompt of a request is likely to take: messages, prompt or input text."""
    return estimate_tokens(text_length(payload, _PROMPT_KEYS)) if payload else 0


def prompt_estimate_of(body: bytes) -> int:
    """`prompt_estimate` of a request body (0 for one that is not a JSON object)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return 0
    return prompt_estimate(payload) if isinstance(payload, Mapping) else 0


def with_stream_usage(path: bytes, payload: Mapping[str, Any]) -> bytes | None:
    """The body to send upstream instead, asking for usage in an OpenAI stream, when the client
    did not ask for it itself; None when nothing needs to change."""
    if path not in STREAM_USAGE_ROUTES or payload.get("stream") is not True:
        return None
    options = payload.get("stream_options")
    if isinstance(options, Mapping) and options.get("include_usage") is True:
        return None
    if options is not None and not isinstance(options, Mapping):
        return None  # not ours to fix: the backend answers the client's mistake
    asked = {**payload, "stream_options": {**(options or {}), "include_usage": True}}
    return json.dumps(asked, ensure_ascii=False, separators=(",", ":")).encode()


class UsageMeter:
    """Reads a response body as it passes, and says how many tokens it carried.

    `prompt` gives the prompt's estimated tokens; it is called only if the backend reported no
    counts (estimating a prompt costs more than the rest of the meter's work on a short answer).
    """

    def __init__(self, kind: StreamKind, *, strip: bool, prompt: Callable[[], int]) -> None:
        self.kind = kind
        self._strip = strip and kind is StreamKind.SSE
        self._prompt = prompt
        self._splitter = FrameSplitter(kind)
        self._whole = kind is StreamKind.OTHER  # one JSON body, read when it ends
        self._body = bytearray()
        self._size = 0
        self._reported: tuple[int, int] | None = None
        self._chunks = 0  # frames that carried generated text; for a whole body, its estimate

    def feed(self, data: bytes) -> bytes:
        """The bytes to pass on for `data`: all of them, unless an event is being stripped."""
        if self._whole:
            self._size += len(data)
            if self._size <= MAX_METERED_BODY:
                self._body += data
            else:
                self._body.clear()  # too large to parse: its size is all we know
            return data
        frames = self._splitter.feed(data)
        kept = [frame for frame in frames if self._read(frame)]
        if not self._strip:
            return data
        return kept[0] if len(kept) == 1 else b"".join(kept)

    def flush(self) -> bytes:
        """The body ended: what was held back."""
        if self._whole:
            if self._size <= MAX_METERED_BODY:
                self._read_whole(bytes(self._body))
            else:
                self._chunks = estimate_tokens(self._size)
            self._body.clear()
            return b""
        kept = [frame for frame in self._splitter.flush() if self._read(frame)]
        return b"".join(kept) if self._strip else b""

    def usage(self) -> Usage:
        """The counts the backend reported, or an estimate from what passed so far."""
        if self._reported is not None:
            return Usage(*self._reported)
        return Usage(self._prompt(), self._chunks, estimated=True)

    def _read(self, frame: bytes) -> bool:
        """Note what a frame says; False when it is the usage-only event to strip."""
        if b'"usage"' in frame or b"eval_count" in frame:
            message = _frame_message(self.kind, frame)
            counts = reported_usage(message)
            if counts is not None:
                self._reported = counts
                if self._strip and isinstance(message, Mapping) and message.get("choices") == []:
                    return False
        if _CONTENT.search(frame):
            self._chunks += 1
        return True

    def _read_whole(self, body: bytes) -> None:
        try:
            message = json.loads(body)
        except ValueError:
            return
        counts = reported_usage(message)
        if counts is not None:
            self._reported = counts
        else:
            self._chunks = estimate_tokens(text_length(message, _ANSWER_KEYS))


def _frame_message(kind: StreamKind, frame: bytes) -> object:
    """The JSON object in an SSE event (its data lines) or an NDJSON line; None if there is
    none."""
    if kind is StreamKind.SSE:
        lines = frame.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        data = b"\n".join(
            line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")
        )
    else:
        data = frame
    try:
        return json.loads(data)
    except ValueError:
        return None
