"""What an incoming request is: which route, which model, streaming or not.

Invariants: no path with dot segments, empty segments, encoded slashes or dots, or
backslashes is routed anywhere (the same 400 wherever they stand); a proxied target always
starts with /v1/ or /api/, so joining it to a backend's base path can never leave that prefix;
a known route asked with a method it does not take is the gateway's 405, never forwarded; a
generation request always carries a non-empty string `model` and a boolean `stream`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ntonix.errors import GatewayError, client_error

PROXIED_PREFIXES = (b"/v1/", b"/api/")

# The routes of the OpenAI and Ollama APIs that the gateway knows, and the methods each takes.
# Any other method on them is answered 405 with `Allow`; OPTIONS always goes through, since a
# browser's CORS preflight is the backend's to answer (Ollama's OLLAMA_ORIGINS, say).
KNOWN_ROUTES: Final[Mapping[bytes, tuple[str, ...]]] = {
    b"/v1/chat/completions": ("POST",),
    b"/v1/completions": ("POST",),
    b"/v1/embeddings": ("POST",),
    b"/v1/responses": ("POST",),
    b"/v1/models": ("GET", "HEAD"),
    b"/api/chat": ("POST",),
    b"/api/generate": ("POST",),
    b"/api/embed": ("POST",),
    b"/api/embeddings": ("POST",),
    b"/api/show": ("POST",),
    b"/api/tags": ("GET", "HEAD"),
    b"/api/ps": ("GET", "HEAD"),
    b"/api/version": ("GET", "HEAD"),
}

# Routes whose JSON body must name a model: what the balancer and the cache key need.
_MODEL_ROUTES = frozenset(
    {
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/embeddings",
        b"/v1/responses",
        b"/api/chat",
        b"/api/generate",
        b"/api/embed",
        b"/api/embeddings",
    }
)
# Ollama streams unless told not to; the OpenAI API does not stream unless asked.
_STREAM_BY_DEFAULT = frozenset({b"/api/chat", b"/api/generate"})

_FORBIDDEN_ENCODINGS = (b"%2f", b"%5c", b"%2e")


@attrs.frozen
class ProxiedRequest:
    """A validated request to forward: upstream target plus what the gateway parsed."""

    target: bytes
    model: str | None = None
    stream: bool = False
    payload: dict[str, Any] | None = None


def is_proxied(raw_path: bytes) -> bool:
    return raw_path.startswith(PROXIED_PREFIXES)


def path_error(raw_path: bytes) -> GatewayError | None:
    """The 400 for a path that no route may see, whatever its prefix: backslashes, empty or
    dot segments, an encoded '/', '\\' or '.'. None for a clean path."""
    if b"\\" in raw_path or b"//" in raw_path:
        return client_error(400, "invalid_path", "The request path is not allowed")
    if b"%" in raw_path and any(enc in raw_path.lower() for enc in _FORBIDDEN_ENCODINGS):
        return client_error(400, "invalid_path", "Encoded '/', '\\' or '.' is not allowed in paths")
    if b"." in raw_path:  # most paths have none: no need to split them
        for segment in raw_path.split(b"/"):
            if segment in (b".", b".."):
                return client_error(400, "invalid_path", "Dot segments are not allowed in paths")
    return None


def method_error(method: str, raw_path: bytes) -> GatewayError | None:
    """The 405 (with `Allow`) for a known route asked with a method it does not take."""
    allowed = KNOWN_ROUTES.get(raw_path)
    if allowed is None or method in allowed or method == "OPTIONS":
        return None
    return GatewayError(
        405,
        "method_not_allowed",
        f"{method} is not allowed on {raw_path.decode()}: use {' or '.join(allowed)}",
        source="client",
        allow=allowed,
    )


def validate_target(raw_path: bytes, query_string: bytes) -> bytes:
    """The origin-form target to send upstream, or a 400/404 for anything that could escape."""
    if not is_proxied(raw_path):
        raise client_error(404, "unknown_route", "Unknown route: only /v1/ and /api/ are proxied")
    if (error := path_error(raw_path)) is not None:
        raise error
    return raw_path + b"?" + query_string if query_string else raw_path


def classify(method: bytes, raw_path: bytes, query_string: bytes, body: bytes) -> ProxiedRequest:
    """Validate a proxied request and pull out what routing needs; raises GatewayError."""
    target = validate_target(raw_path, query_string)
    if method != b"POST" or raw_path not in _MODEL_ROUTES:
        return ProxiedRequest(target)
    payload = _parse_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise client_error(400, "model_required", "'model' is required and must be a string")
    stream = payload.get("stream", raw_path in _STREAM_BY_DEFAULT)
    if not isinstance(stream, bool):
        raise client_error(400, "invalid_type", "'stream' must be a boolean")
    if "messages" in payload and not isinstance(payload["messages"], list):
        raise client_error(400, "invalid_type", "'messages' must be an array")
    return ProxiedRequest(target, model=model, stream=stream, payload=payload)


def _parse_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise client_error(400, "invalid_json", "The request body must be a JSON object")
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise client_error(400, "invalid_json", "The request body is not valid UTF-8") from None
    except ValueError as error:
        raise client_error(400, "invalid_json", f"Malformed JSON body: {error}") from None
    if not isinstance(payload, dict):
        raise client_error(400, "invalid_json", "The request body must be a JSON object")
    return payload
