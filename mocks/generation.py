"""Generated answers and the wire shapes of the APIs that carry them (OpenAI and Ollama).

Invariants: no I/O, and no clock or randomness of its own (the caller passes `now` and `rng`).
A deterministic request (temperature 0 or a seed) gets the same bytes every time, from every node
with the same token settings: its words and ids come from a hash of the body (less `stream`, so
a stream says what the whole answer says), `created` is fixed and durations are the planned
delays. Every other request gets fresh words, ids and timestamps.
"""

import hashlib
import json
import random
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from .options import MockOptions
from .replies import Chunk, Reply, encode_json, json_reply

# A few bytes per word, like real tokens, so chunk sizes look like an LLM's.
VOCABULARY = (
    " the", " a", " cat", " dog", " sat", " on", " mat", " ran", " to", " red", " blue",
    " sun", " sky", " sea", " is", " was", " big", " old", " new", " and", " or", " not",
    " yes", " no", " one", " two", " hot", " cold", " up", " down", " in", " out",
)  # fmt: skip
FIXED_CREATED = 1_700_000_000  # `created` of deterministic answers, so their bytes never change

JSON = Mapping[str, Any]
# Body keys that change how an answer travels, not what it says.
_TRANSPORT_KEYS = frozenset({"stream", "stream_options", "keep_alive"})
_LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "num_predict")
_SSE_HEADERS = (("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"))
_NDJSON_HEADERS = (("content-type", "application/x-ndjson"),)


@attrs.frozen
class Sample:
    """One generated answer, before an API puts it into its shape."""

    model: str
    key: str  # 24 hex digits that ids are made from
    created: float  # seconds since the epoch
    words: tuple[str, ...]
    delays: tuple[float, ...]  # before each word: ttft, then the token delay
    finish_reason: str
    prompt_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.words)

    @property
    def duration(self) -> float:
        return sum(self.delays)

    def timed_words(self) -> list[tuple[str, float]]:
        """Each word with the delay before it."""
        return list(zip(self.words, self.delays, strict=True))

    def usage(self) -> dict[str, int]:
        completion = len(self.words)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def _sample(
    body: JSON, sampling: JSON, options: MockOptions, now: float, rng: random.Random
) -> Sample:
    material = json.dumps(
        {key: value for key, value in body.items() if key not in _TRANSPORT_KEYS},
        sort_keys=True,
        separators=(",", ":"),
    )
    # The APIs default to a temperature above 0, so only an explicit 0 or a seed pins the answer.
    if sampling.get("temperature") == 0 or sampling.get("seed") is not None:
        key, created = hashlib.sha256(material.encode()).hexdigest()[:24], float(FIXED_CREATED)
    else:
        key, created = f"{rng.getrandbits(96):024x}", now
    # `type() is int`: a bool is an int but no limit; Ollama's num_predict -1 means no limit.
    limit = next((sampling[name] for name in _LIMIT_KEYS if type(sampling.get(name)) is int), -1)
    count = options.tokens if limit < 0 else min(options.tokens, limit)
    # Each byte of the hash picks a word: 32 words divide 256, so every word is as likely.
    words = tuple(
        VOCABULARY[byte % len(VOCABULARY)] for byte in hashlib.shake_128(key.encode()).digest(count)
    )
    prompt = json.dumps([body.get("messages"), body.get("prompt")])
    return Sample(
        model=body["model"],
        key=key,
        created=created,
        words=words,
        delays=tuple(options.ttft if index == 0 else options.token_delay for index in range(count)),
        finish_reason="length" if count < options.tokens else "stop",
        prompt_tokens=len(prompt.split()),
    )


def _chat_choice(delta: JSON, finish_reason: str | None = None) -> JSON:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _text_choice(text: str, finish_reason: str | None = None) -> JSON:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _openai_whole(sample: Sample, kind: str, choice: JSON) -> Reply:
    head = {"id": sample.key, "object": kind, "created": int(sample.created), "model": sample.model}
    body = {**head, "choices": [choice], "usage": sample.usage()}
    return json_reply(200, body, delay=sample.duration)


def _openai_stream(
    sample: Sample, kind: str, choices: list[tuple[float, JSON]], body: JSON
) -> Reply:
    """One SSE event per choice chunk, then usage if the client asked for it, then [DONE]."""
    head = {"id": sample.key, "object": kind, "created": int(sample.created), "model": sample.model}
    events = [(delay, {**head, "choices": [choice]}) for delay, choice in choices]
    stream_options = body.get("stream_options")
    if isinstance(stream_options, dict) and stream_options.get("include_usage") is True:
        events.append((0.0, {**head, "choices": [], "usage": sample.usage()}))
    chunks = [Chunk(delay, b"data: " + encode_json(event) + b"\n\n") for delay, event in events]
    chunks.append(Chunk(0.0, b"data: [DONE]\n\n"))
    return Reply(status=200, headers=_SSE_HEADERS, chunks=tuple(chunks))


def _openai_chat(sample: Sample, body: JSON, stream: bool) -> Reply:
    sample = attrs.evolve(sample, key=f"chatcmpl-{sample.key}")
    if not stream:
        message = {"role": "assistant", "content": sample.text}
        choice = {"index": 0, "message": message, "logprobs": None}
        whole = {**choice, "finish_reason": sample.finish_reason}
        return _openai_whole(sample, "chat.completion", whole)
    # As vLLM does, the role chunk goes out with the first token, when prefill is done: the
    # first byte of the body comes after the time to first token.
    timed = sample.timed_words()
    first_delay = timed[0][1] if timed else 0.0
    choices = [(first_delay, _chat_choice({"role": "assistant", "content": ""}))]
    choices += [
        (0.0 if index == 0 else delay, _chat_choice({"content": word}))
        for index, (word, delay) in enumerate(timed)
    ]
    choices.append((0.0, _chat_choice({}, sample.finish_reason)))
    return _openai_stream(sample, "chat.completion.chunk", choices, body)


def _openai_completion(sample: Sample, body: JSON, stream: bool) -> Reply:
    sample = attrs.evolve(sample, key=f"cmpl-{sample.key}")
    if not stream:
        whole = _text_choice(sample.text, sample.finish_reason)
        return _openai_whole(sample, "text_completion", whole)
    choices = [(delay, _text_choice(word)) for word, delay in sample.timed_words()]
    choices.append((0.0, _text_choice("", sample.finish_reason)))
    return _openai_stream(sample, "text_completion", choices, body)


def timestamp(seconds: float) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at`."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ollama_reply(sample: Sample, stream: bool, content: Callable[[str], JSON]) -> Reply:
    """Ollama's NDJSON lines, one per word, then a `done` line with counts and durations."""
    total = round(sample.duration * 1e9)
    prompt_eval = round(sample.delays[0] * 1e9) if sample.delays else 0
    done = {
        "done_reason": sample.finish_reason,
        "done": True,
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": sample.prompt_tokens,
        "prompt_eval_duration": prompt_eval,
        "eval_count": len(sample.words),
        "eval_duration": total - prompt_eval,
    }
    finished_at = timestamp(sample.created + sample.duration)
    if not stream:
        whole = {"model": sample.model, "created_at": finished_at, **content(sample.text), **done}
        return json_reply(200, whole, delay=sample.duration)
    chunks, elapsed = [], 0.0
    for word, delay in sample.timed_words():
        elapsed += delay
        line = {"model": sample.model, "created_at": timestamp(sample.created + elapsed)}
        chunks.append(Chunk(delay, encode_json({**line, **content(word), "done": False}) + b"\n"))
    last = {"model": sample.model, "created_at": finished_at, **content(""), **done}
    chunks.append(Chunk(0.0, encode_json(last) + b"\n"))
    return Reply(status=200, headers=_NDJSON_HEADERS, chunks=tuple(chunks))


def _ollama_chat(sample: Sample, body: JSON, stream: bool) -> Reply:
    return _ollama_reply(
        sample, stream, lambda text: {"message": {"role": "assistant", "content": text}}
    )


def _ollama_generate(sample: Sample, body: JSON, stream: bool) -> Reply:
    return _ollama_reply(sample, stream, lambda text: {"response": text})


def _ollama_sampling(body: JSON) -> JSON:
    # Ollama reads `options` only, but clients used to OpenAI put temperature and seed at the top
    # level: the mock honours both, so such a request is as deterministic as it looks.
    options = body.get("options")
    return {**body, **options} if isinstance(options, dict) else body


@attrs.frozen
class _Api:
    streams_by_default: bool
    sampling: Callable[[JSON], JSON]  # where temperature, seed and the token limit live
    render: Callable[[Sample, JSON, bool], Reply]


_APIS = {
    "/v1/chat/completions": _Api(False, lambda body: body, _openai_chat),
    "/v1/completions": _Api(False, lambda body: body, _openai_completion),
    "/api/chat": _Api(True, _ollama_sampling, _ollama_chat),
    "/api/generate": _Api(True, _ollama_sampling, _ollama_generate),
}
PATHS = frozenset(_APIS)


def generate(
    path: str, body: JSON, options: MockOptions, *, now: float, rng: random.Random
) -> Reply:
    """The answer to a valid generation request (a JSON object naming a served model)."""
    api = _APIS[path]
    sample = _sample(body, api.sampling(body), options, now, rng)
    return api.render(sample, body, bool(body.get("stream", api.streams_by_default)))
