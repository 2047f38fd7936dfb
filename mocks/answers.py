"""What the mock answers: a pure function from a request to its reply, shared by both servers.

Invariants: no I/O, and no clock or randomness of its own (the caller passes `now` and `rng`).
`x-mock-*` headers are read here and only here; they apply to every route.
"""

import http
import json
import math
import random
from collections.abc import Callable, Mapping
from typing import TypeVar

import attrs

from . import generation
from .generation import FIXED_CREATED
from .options import MockOptions
from .replies import Reply, Request, error_reply, json_reply, whole_reply

_Number = TypeVar("_Number", int, float)
_ERROR_STATUSES = frozenset(status.value for status in http.HTTPStatus if status >= 400)


def _header_number(headers: Mapping[str, str], name: str, kind: type[_Number]) -> _Number | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value: _Number | None = kind(raw)
    except ValueError:
        value = None
    if value is None or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a non-negative {kind.__name__}, got {raw!r}")
    return value


@attrs.frozen
class _Overrides:
    """The `x-mock-*` headers of one request."""

    tokens: int | None
    token_delay: float | None
    ttft: float | None
    status: int | None
    hang: bool
    drop_after: int | None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> "_Overrides":
        """Parse the headers; a bad value raises ValueError naming the header."""
        status = _header_number(headers, "x-mock-status", int)
        if status is not None and status not in _ERROR_STATUSES:
            raise ValueError(f"x-mock-status must be an HTTP error status, got {status}")
        return cls(
            tokens=_header_number(headers, "x-mock-tokens", int),
            token_delay=_header_number(headers, "x-mock-token-delay", float),
            ttft=_header_number(headers, "x-mock-ttft", float),
            status=status,
            hang=headers.get("x-mock-hang", "0").lower() not in {"0", "false"},
            drop_after=_header_number(headers, "x-mock-drop-after", int),
        )

    def apply(self, options: MockOptions) -> MockOptions:
        if self.tokens is None and self.token_delay is None and self.ttft is None:
            return options  # the usual case, and evolve() is not free
        return attrs.evolve(
            options,
            tokens=options.tokens if self.tokens is None else self.tokens,
            token_delay=options.token_delay if self.token_delay is None else self.token_delay,
            ttft=options.ttft if self.ttft is None else self.ttft,
        )


def _openai_models(options: MockOptions) -> Reply:
    models = [
        {"id": model, "object": "model", "created": FIXED_CREATED, "owned_by": "mock"}
        for model in options.models
    ]
    return json_reply(200, {"object": "list", "data": models})


def _ollama_tags(options: MockOptions) -> Reply:
    modified_at = generation.timestamp(FIXED_CREATED)
    models = [
        {"name": model, "model": model, "modified_at": modified_at, "size": 0, "digest": ""}
        for model in options.models
    ]
    return json_reply(200, {"models": models})


_LISTINGS: dict[str, Callable[[MockOptions], Reply]] = {
    "/v1/models": _openai_models,
    "/api/tags": _ollama_tags,
    "/health": lambda _: whole_reply(200, "text/plain", b""),  # vLLM answers an empty 200
    "/": lambda _: whole_reply(200, "text/plain; charset=utf-8", b"Ollama is running"),
}


def is_generation(request: Request) -> bool:
    """Whether the request asks for a completion: what the stats count as a request."""
    return request.method == "POST" and request.path in generation.PATHS


def _generate(request: Request, options: MockOptions, now: float, rng: random.Random) -> Reply:
    try:
        body = json.loads(request.body)
    except ValueError:
        return error_reply(400, "the request body is not valid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return error_reply(400, "the request body must be a JSON object with a string `model`")
    if body["model"] not in options.models:
        return error_reply(404, f"The model `{body['model']}` does not exist.")
    if options.fail_rate > 0 and rng.random() < options.fail_rate:
        return error_reply(500, f"mock failure (fail rate {options.fail_rate})")
    return generation.generate(request.path, body, options, now=now, rng=rng)


def _route(request: Request, options: MockOptions, now: float, rng: random.Random) -> Reply:
    if request.path in generation.PATHS:
        if request.method != "POST":
            return error_reply(405, f"{request.path} takes POST")
        return _generate(request, options, now, rng)
    listing = _LISTINGS.get(request.path)
    if listing is None:
        return error_reply(404, f"no route {request.method} {request.path}")
    if request.method != "GET":
        return error_reply(405, f"{request.path} takes GET")
    return listing(options)


def answer(request: Request, options: MockOptions, *, now: float, rng: random.Random) -> Reply:
    """The reply to `request`, given the backend's options, the time and a random source."""
    try:
        overrides = _Overrides.from_headers(request.headers)
    except ValueError as error:
        return error_reply(400, str(error))
    options = overrides.apply(options)
    if overrides.status is None:
        reply = _route(request, options, now, rng)
    else:
        reply = error_reply(overrides.status, f"x-mock-status: {overrides.status}")
    return attrs.evolve(
        reply,
        # A header, not the body, says which node answered: bodies never depend on the name.
        headers=(*reply.headers, ("x-mock-name", options.name)),
        hang=overrides.hang,
        drop_after=overrides.drop_after,
    )
