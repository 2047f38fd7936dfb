"""The mock's vocabulary: a request as read off the wire, and a reply as chunks and delays.

Invariants: a `Reply` has at least one body chunk, and it carries `content-length` exactly when
it is meant to be sent in one piece; a streamed reply goes out with chunked transfer encoding.
"""

import http
import json
from collections.abc import Mapping

import attrs


@attrs.frozen
class Request:
    """One HTTP request, body read whole; header names are lowercase."""

    method: str
    path: str  # without the query string
    headers: Mapping[str, str]
    body: bytes


@attrs.frozen
class Chunk:
    """A piece of a response body, written `delay` seconds after the previous one."""

    delay: float
    data: bytes


@attrs.frozen
class Reply:
    """What to send: the head, the body chunks and when, and whether to misbehave."""

    status: int
    headers: tuple[tuple[str, str], ...]
    chunks: tuple[Chunk, ...] = attrs.field(validator=attrs.validators.min_len(1))
    hang: bool = False  # accept the request and never answer
    drop_after: int | None = None  # abort the connection after this many chunks

    @property
    def duration(self) -> float:
        """Seconds the reply spends waiting between its chunks."""
        return sum(chunk.delay for chunk in self.chunks)


def encode_json(value: object) -> bytes:
    """Compact JSON, as vLLM and Ollama write it."""
    return json.dumps(value, separators=(",", ":")).encode()


def whole_reply(status: int, content_type: str, body: bytes, *, delay: float = 0.0) -> Reply:
    """A reply sent in one piece, with a `content-length`."""
    headers = (("content-type", content_type), ("content-length", str(len(body))))
    return Reply(status=status, headers=headers, chunks=(Chunk(delay, body),))


def json_reply(status: int, value: object, *, delay: float = 0.0) -> Reply:
    return whole_reply(status, "application/json", encode_json(value), delay=delay)


def error_reply(status: int, message: str) -> Reply:
    """An error in OpenAI's shape, `{"error": {"message", "type", "code"}}`, typed like vLLM's."""
    phrase = http.HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    kind = phrase if phrase.endswith("Error") else f"{phrase}Error"
    return json_reply(status, {"error": {"message": message, "type": kind, "code": status}})
