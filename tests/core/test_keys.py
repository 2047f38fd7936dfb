import hashlib
import json
import random
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ntonix.core.keys import Decision, cache_key, cacheability, scope_for

CHAT = b"/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def _key(
    method: bytes = b"POST",
    path: bytes = CHAT,
    scope: str = "global",
    payload: Mapping[str, object] = BODY,
) -> str:
    return cache_key(method, path, scope, payload)


# -- cache_key ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
payloads = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@given(payloads, st.randoms(use_true_random=False), st.sampled_from([None, 1, 4]))
def test_key_ignores_key_order_and_whitespace(
    payload: dict[str, object], rng: random.Random, indent: int | None
) -> None:
    items = list(payload.items())
    rng.shuffle(items)
    reparsed = json.loads(json.dumps(dict(items), indent=indent, ensure_ascii=True))
    assert _key(payload=reparsed) == _key(payload=payload)


def test_key_is_sha256_hex() -> None:
    key = _key()
    assert len(key) == 64
    assert int(key, 16) >= 0


@attrs.frozen
class Variant:
    name: str
    changes: dict[str, Any]


BASE_KEY_VARIANTS = [
    Variant("temperature 0.2 vs 0.7", {"payload": {**BODY, "temperature": 0.2}}),
    Variant("other temperature", {"payload": {**BODY, "temperature": 0.7}}),
    Variant("seed", {"payload": {**BODY, "seed": 1}}),
    Variant("other seed", {"payload": {**BODY, "seed": 2}}),
    Variant("top_p", {"payload": {**BODY, "top_p": 0.9}}),
    Variant("max_tokens", {"payload": {**BODY, "max_tokens": 5}}),
    Variant("stream", {"payload": {**BODY, "stream": True}}),
    Variant("model", {"payload": {**BODY, "model": "m2"}}),
    Variant("prompt", {"payload": {**BODY, "messages": [{"role": "user", "content": "ho"}]}}),
    Variant("path", {"path": b"/v1/completions"}),
    Variant("query", {"path": CHAT + b"?x=1"}),
    Variant("method", {"method": b"PUT"}),
    Variant("scope", {"scope": scope_for("sk-a", "key")}),
    Variant("other scope", {"scope": scope_for("sk-b", "key")}),
    Variant("anonymous", {"scope": "anonymous"}),
    Variant("lone surrogate", {"payload": {**BODY, "x": "\ud800"}}),
    Variant("non-ascii", {"payload": {**BODY, "x": "é"}}),
]


def test_every_part_of_the_request_changes_the_key() -> None:
    keys = {"base": _key()} | {v.name: _key(**v.changes) for v in BASE_KEY_VARIANTS}
    assert len(set(keys.values())) == len(keys), keys


@pytest.mark.parametrize(
    ("left", "right"),
    [
        # Moving bytes from one part to its neighbour must not give the same key.
        ((b"POST", b"/v1/x", "global"), (b"POST/", b"v1/x", "global")),
        ((b"POST", b"/v1/xg", "lobal"), (b"POST", b"/v1/x", "global")),
        ((b"", b"POST/v1/x", "global"), (b"POST", b"/v1/x", "global")),
    ],
)
def test_parts_cannot_bleed_into_each_other(
    left: tuple[bytes, bytes, str], right: tuple[bytes, bytes, str]
) -> None:
    assert cache_key(*left, {}) != cache_key(*right, {})


@given(st.binary(max_size=8), st.integers(0, 8), st.integers(0, 8))
def test_where_method_ends_and_path_begins_matters(joined: bytes, i: int, j: int) -> None:
    assume(i != j and max(i, j) <= len(joined))
    assert cache_key(joined[:i], joined[i:], "s", {}) != cache_key(joined[:j], joined[j:], "s", {})


@given(st.text(max_size=8), st.integers(0, 8), st.integers(0, 8))
def test_where_scope_ends_and_body_begins_matters(joined: str, i: int, j: int) -> None:
    assume(i != j and max(i, j) <= len(joined))
    # The scope's tail and a body key share characters: framing, not luck, keeps them apart.
    left = cache_key(b"POST", CHAT, joined[:i], {joined[i:]: 1})
    assert left != cache_key(b"POST", CHAT, joined[:j], {joined[j:]: 1})


# -- scope_for ------------------------------------------------------------------------------


def test_scope_global_is_shared_by_everyone() -> None:
    assert scope_for("sk-a", "global") == scope_for(None, "global") == "global"


def test_scope_key_hashes_the_key_and_never_holds_it() -> None:
    scope = scope_for("sk-secret", "key")
    assert scope == hashlib.sha256(b"sk-secret").hexdigest()
    assert "sk-secret" not in scope
    assert scope != scope_for("sk-other", "key")


@pytest.mark.parametrize("api_key", [None, ""])
def test_scope_without_auth_is_anonymous(api_key: str | None) -> None:
    assert scope_for(api_key, "key") == "anonymous"


def test_unknown_scope_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="scope"):
        scope_for("sk", "per-user")


# -- cacheability ---------------------------------------------------------------------------


@attrs.frozen
class Case:
    name: str
    path: bytes
    payload: Mapping[str, object]
    decision: Decision
    cache_control: bytes = b""
    deterministic_only: bool = True


YES = Decision(lookup=True, store=True, reason="deterministic")
SAMPLED = Decision(lookup=False, store=False, reason="sampled")
ROUTE = Decision(lookup=False, store=False, reason="route")
M: dict[str, object] = {"model": "m"}

CASES = [
    Case("temperature 0", CHAT, {**M, "temperature": 0}, YES),
    Case("temperature 0.0", CHAT, {**M, "temperature": 0.0}, YES),
    Case("seed", CHAT, {**M, "temperature": 0.7, "seed": 42}, YES),
    Case("seed 0", CHAT, {**M, "seed": 0}, YES),
    Case("missing temperature", CHAT, M, SAMPLED),
    Case("temperature 0.7", CHAT, {**M, "temperature": 0.7}, SAMPLED),
    Case("null temperature", CHAT, {**M, "temperature": None}, SAMPLED),
    Case("null seed", CHAT, {**M, "temperature": 1, "seed": None}, SAMPLED),
    Case("false is not 0", CHAT, {**M, "temperature": False}, SAMPLED),
    Case("true is not a seed", CHAT, {**M, "seed": True}, SAMPLED),
    Case("string temperature", CHAT, {**M, "temperature": "0"}, SAMPLED),
    Case("string seed", CHAT, {**M, "seed": "42"}, SAMPLED),
    Case("completions", b"/v1/completions", {**M, "temperature": 0}, YES),
    Case("openai ignores options", CHAT, {**M, "options": {"temperature": 0}}, SAMPLED),
    Case("ollama options temperature", b"/api/chat", {**M, "options": {"temperature": 0}}, YES),
    Case("ollama options seed", b"/api/generate", {**M, "options": {"seed": 7}}, YES),
    Case("ollama top-level temperature", b"/api/chat", {**M, "temperature": 0}, YES),
    Case("ollama top-level seed", b"/api/generate", {**M, "seed": 7}, YES),
    Case("ollama sampled", b"/api/chat", {**M, "options": {"temperature": 0.8}}, SAMPLED),
    Case("ollama default", b"/api/chat", M, SAMPLED),
    Case(
        "ollama options win over top level",
        b"/api/chat",
        {**M, "temperature": 0, "options": {"temperature": 0.8}},
        SAMPLED,
    ),
    Case("ollama bad options", b"/api/chat", {**M, "temperature": 0, "options": 3}, YES),
    Case("openai embeddings", b"/v1/embeddings", {**M, "input": "x"}, YES),
    Case("ollama embed", b"/api/embed", {**M, "input": "x"}, YES),
    Case("ollama embeddings", b"/api/embeddings", {**M, "prompt": "x"}, YES),
    Case("models list", b"/v1/models", {}, ROUTE),
    Case("responses api", b"/v1/responses", {**M, "temperature": 0}, ROUTE),
    Case("ollama tags", b"/api/tags", {}, ROUTE),
    Case(
        "no-cache",
        CHAT,
        {**M, "temperature": 0},
        Decision(lookup=False, store=True, reason="no-cache"),
        cache_control=b"no-cache",
    ),
    Case(
        "no-store",
        CHAT,
        {**M, "temperature": 0},
        Decision(lookup=True, store=False, reason="no-store"),
        cache_control=b"No-Store",
    ),
    Case(
        "both, with spaces and arguments",
        CHAT,
        {**M, "temperature": 0},
        Decision(lookup=False, store=False, reason="no-cache"),
        cache_control=b"max-age=0 , NO-STORE,no-cache",
    ),
    Case(
        "other directives",
        CHAT,
        {**M, "temperature": 0},
        YES,
        cache_control=b"max-age=60, no-transform",
    ),
    Case(
        "directive names are matched whole",
        CHAT,
        {**M, "temperature": 0},
        YES,
        cache_control=b"no-cache-please, x-no-store",
    ),
    Case("sampled beats no-cache", CHAT, M, SAMPLED, cache_control=b"no-cache"),
    Case("route beats everything", b"/v1/models", M, ROUTE, cache_control=b"no-cache"),
    Case(
        "deterministic_only off caches sampled",
        CHAT,
        {**M, "temperature": 0.7},
        Decision(lookup=True, store=True, reason="any"),
        deterministic_only=False,
    ),
    Case("deterministic_only off, deterministic", CHAT, M | {"seed": 1}, YES, b"", False),
    Case("deterministic_only off, still a route", b"/v1/models", M, ROUTE, b"", False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_cacheability(case: Case) -> None:
    decision = cacheability(
        case.path,
        case.payload,
        deterministic_only=case.deterministic_only,
        cache_control=case.cache_control,
    )
    assert decision == case.decision
