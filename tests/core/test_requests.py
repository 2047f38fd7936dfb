import json

import pytest

from ntonix.core.requests import KNOWN_ROUTES, classify, method_error, path_error, validate_target
from ntonix.errors import Dialect, GatewayError, client_error, dialect_of


def _chat(**payload: object) -> bytes:
    return json.dumps({"model": "m", "messages": [], **payload}).encode()


@pytest.mark.parametrize(
    ("raw_path", "query", "target"),
    [
        (b"/v1/chat/completions", b"", b"/v1/chat/completions"),
        (b"/api/chat", b"", b"/api/chat"),
        (b"/v1/models", b"a=1", b"/v1/models?a=1"),
        (b"/v1/files/file-abc@x", b"", b"/v1/files/file-abc@x"),
    ],
)
def test_valid_targets_pass_unchanged(raw_path: bytes, query: bytes, target: bytes) -> None:
    assert validate_target(raw_path, query) == target


@pytest.mark.parametrize(
    ("raw_path", "status"),
    [
        (b"/", 404),
        (b"/v2/chat", 404),
        (b"http://169.254.169.254/v1/x", 404),
        (b"/v1/../admin", 400),
        (b"/v1/./models", 400),
        (b"/v1/%2e%2e/admin", 400),
        (b"/v1/%2E%2E/admin", 400),
        (b"/v1/a%2fb", 400),
        (b"/v1/a%5Cb", 400),
        (b"/v1/a\\b", 400),
        (b"/v1//evil.example/x", 400),
    ],
)
def test_escaping_targets_are_refused(raw_path: bytes, status: int) -> None:
    with pytest.raises(GatewayError) as caught:
        validate_target(raw_path, b"")
    assert caught.value.status == status


@pytest.mark.parametrize(
    ("path", "body", "model", "stream"),
    [
        (b"/v1/chat/completions", _chat(), "m", False),
        (b"/v1/chat/completions", _chat(stream=True), "m", True),
        (b"/api/chat", _chat(), "m", True),
        (b"/api/generate", _chat(stream=False), "m", False),
    ],
)
def test_generation_requests_are_classified(
    path: bytes, body: bytes, model: str, stream: bool
) -> None:
    request = classify(b"POST", path, b"", body)
    assert (request.model, request.stream) == (model, stream)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"messages": []}', "model_required"),
        (b'{"model": 5}', "model_required"),
        (b'{"model": ""}', "model_required"),
        (b'{"model": "m", "stream": "yes"}', "invalid_type"),
        (b'{"model": "m", "messages": "hi"}', "invalid_type"),
    ],
)
def test_bad_generation_bodies_are_400(body: bytes, code: str) -> None:
    with pytest.raises(GatewayError) as caught:
        classify(b"POST", b"/v1/chat/completions", b"", body)
    assert (caught.value.status, caught.value.code) == (400, code)


def test_other_routes_pass_without_parsing() -> None:
    assert classify(b"GET", b"/v1/models", b"", b"").model is None
    assert classify(b"POST", b"/api/pull", b"", b"not json").payload is None


@pytest.mark.parametrize(
    "raw_path",
    [b"/v1%2Fmodels", b"/v1/chat%2Fcompletions", b"%2Fv1/models", b"/api%2fchat", b"/ntonix%2Fx"],
)
def test_an_encoded_slash_gets_the_same_400_wherever_it_stands(raw_path: bytes) -> None:
    error = path_error(raw_path)
    assert error is not None and error.status == 400 and error.code == "invalid_path"
    assert error.message == "Encoded '/', '\\' or '.' is not allowed in paths"


@pytest.mark.parametrize("raw_path", [b"/v1/models", b"/ntonix/status", b"/", b"/v2/x%20y"])
def test_clean_paths_pass(raw_path: bytes) -> None:
    assert path_error(raw_path) is None


@pytest.mark.parametrize(
    ("method", "raw_path", "allow"),
    [
        ("GET", b"/v1/chat/completions", "POST"),
        ("PUT", b"/v1/embeddings", "POST"),
        ("POST", b"/v1/models", "GET, HEAD"),
        ("GET", b"/api/chat", "POST"),
        ("DELETE", b"/api/tags", "GET, HEAD"),
    ],
)
def test_a_known_route_with_another_method_is_405_with_allow(
    method: str, raw_path: bytes, allow: str
) -> None:
    error = method_error(method, raw_path)
    assert error is not None and (error.status, error.code) == (405, "method_not_allowed")
    assert (b"allow", allow.encode()) in error.headers()
    assert error.message.startswith(f"{method} is not allowed on {raw_path.decode()}: use ")


@pytest.mark.parametrize(
    ("method", "raw_path"),
    [
        ("POST", b"/v1/chat/completions"),
        ("HEAD", b"/v1/models"),
        ("OPTIONS", b"/v1/chat/completions"),  # a browser's CORS preflight: the backend's call
        ("GET", b"/v1/files"),  # not a route the gateway knows: the backend answers
        ("DELETE", b"/api/delete"),
    ],
)
def test_allowed_methods_and_unknown_routes_pass(method: str, raw_path: bytes) -> None:
    assert method_error(method, raw_path) is None


def test_every_known_route_is_under_a_proxied_prefix() -> None:
    assert all(validate_target(path, b"") == path for path in KNOWN_ROUTES)


def test_an_error_in_each_dialect() -> None:
    error = client_error(400, "invalid_json", "Malformed JSON body")
    assert error.payload(Dialect.OLLAMA) == {"error": "Malformed JSON body"}
    assert error.payload(Dialect.OPENAI) == {
        "error": {
            "message": "Malformed JSON body",
            "type": "invalid_request_error",
            "code": "invalid_json",
        }
    }
    assert json.loads(error.body(Dialect.OLLAMA)) == {"error": "Malformed JSON body"}
    assert [dialect_of(p) for p in ("/api/chat", "/v1/models", "/ntonix/status", "/apix")] == [
        Dialect.OLLAMA,
        Dialect.OPENAI,
        Dialect.OPENAI,
        Dialect.OPENAI,
    ]
