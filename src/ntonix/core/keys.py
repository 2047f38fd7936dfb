"""Cache keys, and whether a request may be answered from or stored in the cache.

Invariants: a key is a SHA-256 over method, path, scope and the canonical JSON body, each part
length-prefixed, so two requests share a key only when all four parts are equal (no part can
bleed into the next, and key order or whitespace in the body never matter); a scope never holds
an API key itself, only its hash; with `deterministic_only`, a request that may be sampled
(temperature above 0 or missing, and no integer seed) is neither looked up nor stored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import attrs

# Bumped whenever the key's layout changes, so old and new layouts can never collide.
_KEY_DOMAIN = b"ntonix-cache-key/1"

_EMBEDDING_ROUTES = frozenset({b"/v1/embeddings", b"/api/embed", b"/api/embeddings"})
CACHEABLE_ROUTES = frozenset(
    {b"/v1/chat/completions", b"/v1/completions", b"/api/chat", b"/api/generate"}
    | _EMBEDDING_ROUTES
)
# Ollama reads sampling parameters from `options`; the mock also honours them at the top level.
_OPTIONS_ROUTES = frozenset({b"/api/chat", b"/api/generate"})


@attrs.frozen
class Decision:
    """What the cache may do with one request.

    `lookup`: may be answered from the cache (or by joining an identical request in flight);
    `store`: its response may be stored; `reason`: one word for logs and metrics.
    """

    lookup: bool
    store: bool
    reason: str


def cache_key(method: bytes, path: bytes, scope: str, payload: Mapping[str, object]) -> str:
    """SHA-256 hex digest naming one cacheable request.

    `path` is the target as forwarded (with its query string, if any); `scope` comes from
    `scope_for`. The body is canonical JSON: sorted keys, compact separators, raw UTF-8, so
    every parameter counts but formatting does not.
    """
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(_KEY_DOMAIN)
    # surrogatepass: a body may carry a lone surrogate escape (`"\ud800"`), still a distinct key.
    for part in (method, path, scope.encode(), body.encode("utf-8", "surrogatepass")):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def scope_for(api_key: str | None, scope_setting: str) -> str:
    """Whose cache a request reads: "global", "anonymous" or the SHA-256 hex of its API key."""
    if scope_setting == "global":
        return "global"
    if scope_setting != "key":
        raise ValueError(f"unknown cache scope {scope_setting!r}")
    if not api_key:
        return "anonymous"
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def cacheability(
    path: bytes, payload: Mapping[str, object], *, deterministic_only: bool, cache_control: bytes
) -> Decision:
    """May this request be looked up, and its response stored?

    `path` is the route without its query string; `cache_control` is the request's
    Cache-Control value (several headers joined with ", "; b"" when absent). Reasons, in order
    of precedence: "route", "sampled", "no-cache", "no-store", "deterministic", "any" (a
    sampled request cached because `deterministic_only` is off).
    """
    if path not in CACHEABLE_ROUTES:
        return Decision(lookup=False, store=False, reason="route")
    deterministic = path in _EMBEDDING_ROUTES or _is_deterministic(path, payload)
    if deterministic_only and not deterministic:
        return Decision(lookup=False, store=False, reason="sampled")
    directives = _directives(cache_control)
    lookup = b"no-cache" not in directives
    store = b"no-store" not in directives
    if not lookup:
        return Decision(lookup=False, store=store, reason="no-cache")
    if not store:
        return Decision(lookup=True, store=False, reason="no-store")
    return Decision(lookup=True, store=True, reason="deterministic" if deterministic else "any")


def _is_deterministic(path: bytes, payload: Mapping[str, object]) -> bool:
    sampling: Mapping[str, object] = payload
    options = payload.get("options")
    if path in _OPTIONS_ROUTES and isinstance(options, Mapping):
        # Per parameter, `options` wins over the top level, as Ollama (and the mock) read it.
        sampling = {**payload, **options}
    temperature = sampling.get("temperature")
    seed = sampling.get("seed")
    # bool is an int subclass: `false` is not a temperature of 0, nor `true` a seed.
    zero = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    seeded = isinstance(seed, int) and not isinstance(seed, bool)
    return (zero and temperature == 0) or seeded


def _directives(cache_control: bytes) -> frozenset[bytes]:
    """Directive names of a Cache-Control value, lowercased, arguments dropped."""
    names = (item.split(b"=", 1)[0].strip().lower() for item in cache_control.split(b","))
    return frozenset(name for name in names if name)
