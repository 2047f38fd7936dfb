import json

import pytest

from ntonix.core.requests import classify, validate_target
from ntonix.errors import GatewayError


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
