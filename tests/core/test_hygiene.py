"""Request hygiene: header limits, ambiguous framing, refused methods and targets."""

from __future__ import annotations

import pytest

from ntonix.core.hygiene import MAX_HEADER_BYTES, MAX_HEADER_FIELDS, check_request

OK_HEADERS = [(b"host", b"gw"), (b"content-type", b"application/json")]


def _code(method: str, path: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    error = check_request(method, path, headers)
    return None if error is None else (error.status, error.code)


def test_an_ordinary_request_passes() -> None:
    assert _code("POST", b"/v1/chat/completions", [*OK_HEADERS, (b"content-length", b"2")]) is None
    assert _code("POST", b"/v1/x", [*OK_HEADERS, (b"transfer-encoding", b"chunked")]) is None


def test_field_count_limit_is_inclusive() -> None:
    at_limit = [(b"x-h", b"v")] * MAX_HEADER_FIELDS
    assert _code("GET", b"/v1/models", at_limit) is None
    too_many = [*at_limit, (b"x-h", b"v")]
    assert _code("GET", b"/v1/models", too_many) == (431, "request_header_fields_too_large")


def test_header_bytes_limit_counts_the_wire_size() -> None:
    value_at_limit = b"v" * (MAX_HEADER_BYTES - len(b"x-big") - 4)
    assert _code("GET", b"/v1/models", [(b"x-big", value_at_limit)]) is None
    over = [(b"x-big", value_at_limit + b"v")]
    assert _code("GET", b"/v1/models", over) == (431, "request_header_fields_too_large")


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"5"), (b"content-length", b"5")],
        [(b"content-length", b"5"), (b"content-length", b"6")],
    ],
    ids=["repeated", "different"],
)
def test_more_than_one_content_length_is_400(headers: list[tuple[bytes, bytes]]) -> None:
    assert _code("POST", b"/v1/completions", headers) == (400, "invalid_framing")


def test_content_length_with_transfer_encoding_is_400() -> None:
    headers = [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")]
    assert _code("POST", b"/v1/completions", headers) == (400, "invalid_framing")


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
def test_tunnel_and_trace_methods_are_405(method: str) -> None:
    assert _code(method, b"/v1/models", OK_HEADERS) == (405, "method_not_allowed")


@pytest.mark.parametrize("target", [b"http://169.254.169.254/x", b"*", b"example.com:443", b""])
def test_only_origin_form_targets_pass(target: bytes) -> None:
    assert _code("GET", target, OK_HEADERS) == (400, "invalid_target")


def test_header_limits_come_before_everything_else() -> None:
    too_many = [(b"content-length", b"1")] * (MAX_HEADER_FIELDS + 1)
    assert _code("CONNECT", b"*", too_many) == (431, "request_header_fields_too_large")
