"""The pure decisions of a WebSocket session: its model, its handshake headers, its closes."""

from __future__ import annotations

import attrs
import pytest

from ntonix.core.health import Outcome
from ntonix.core.websocket import (
    MAX_REASON_BYTES,
    SHUTDOWN,
    Close,
    Closer,
    backend_closed,
    client_accept_headers,
    client_closed,
    idle_ending,
    session_model,
    too_big,
    upstream_handshake_headers,
)


@pytest.mark.parametrize(
    ("query", "model"),
    [
        (b"model=gpt-realtime", "gpt-realtime"),
        (b"intent=transcription&model=voxtral%2Fmini", "voxtral/mini"),
        (b"model=a&model=b", "a"),
        (b"model=", None),
        (b"", None),
        (b"models=a", None),
    ],
)
def test_the_model_comes_from_the_query(query: bytes, model: str | None) -> None:
    assert session_model(query) == model


CLIENT_HANDSHAKE = [
    (b"host", b"gateway:8000"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-protocol", b"realtime"),
    (b"sec-websocket-extensions", b"permessage-deflate"),
    (b"authorization", b"Bearer client-key"),
    (b"openai-beta", b"realtime=v1"),
    (b"x-forwarded-for", b"10.0.0.1"),
]


def test_the_backend_handshake_carries_its_own_key_and_no_client_handshake_headers() -> None:
    headers = upstream_handshake_headers(
        CLIENT_HANDSHAKE,
        client_address=b"10.0.0.2",
        scheme=b"wss",
        request_id=b"r1",
        api_key="backend-key",
    )
    names = [name for name, _ in headers]
    assert not any(name.startswith(b"sec-websocket-") for name in names)
    assert b"host" not in names and b"upgrade" not in names and b"connection" not in names
    assert (b"authorization", b"Bearer backend-key") in headers
    assert (b"authorization", b"Bearer client-key") not in headers
    assert (b"openai-beta", b"realtime=v1") in headers
    assert (b"x-forwarded-for", b"10.0.0.1, 10.0.0.2") in headers
    assert (b"x-forwarded-proto", b"https") in headers
    assert (b"x-forwarded-host", b"gateway:8000") in headers
    assert (b"x-request-id", b"r1") in headers


def test_without_a_backend_key_no_credentials_reach_the_backend() -> None:
    headers = upstream_handshake_headers(
        CLIENT_HANDSHAKE, client_address=b"c", scheme=b"ws", request_id=b"r", api_key=""
    )
    assert not any(name == b"authorization" for name, _ in headers)
    assert (b"x-forwarded-proto", b"http") in headers


def test_the_client_learns_the_backend_and_request_id_but_not_its_handshake_headers() -> None:
    backend = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        (b"sec-websocket-protocol", b"realtime"),
        (b"x-session-region", b"eu"),
        (b"server", b"uvicorn"),
    ]
    headers = client_accept_headers(backend, backend=b"vllm-a", request_id=b"r1")
    assert headers == [
        (b"x-session-region", b"eu"),
        (b"x-ntonix-backend", b"vllm-a"),
        (b"x-request-id", b"r1"),
    ]


@attrs.frozen
class CloseCase:
    code: int
    reason: str
    to_other: Close
    backend_failed: bool = False


CLIENT_CLOSES = [
    CloseCase(1000, "done", Close(1000, "done")),
    CloseCase(1001, "", Close(1001, "")),
    CloseCase(4000, "app", Close(4000, "app")),
    CloseCase(1009, "", Close(1009, "")),
    CloseCase(1005, "", Close(1000)),  # a close frame without a code
    CloseCase(1006, "", Close(1001, "client gone")),  # vanished: no close frame
]


@pytest.mark.parametrize("case", CLIENT_CLOSES, ids=lambda c: str(c.code))
def test_a_client_close_is_passed_to_the_backend(case: CloseCase) -> None:
    ending = client_closed(case.code, case.reason)
    assert ending.closer is Closer.CLIENT
    assert ending.to_backend == case.to_other
    assert ending.to_client is None
    assert ending.outcome is Outcome.COMPLETED


BACKEND_CLOSES = [
    CloseCase(1000, "bye", Close(1000, "bye")),
    CloseCase(1008, "policy", Close(1008, "policy")),
    CloseCase(4001, "quota", Close(4001, "quota")),
    CloseCase(1009, "too big", Close(1009, "too big")),
    CloseCase(1011, "oops", Close(1011, "oops"), backend_failed=True),
    CloseCase(1005, "", Close(1000)),
    CloseCase(1006, "", Close(1011, "backend gone"), backend_failed=True),
    CloseCase(1015, "", Close(1011, "backend gone"), backend_failed=True),
]


@pytest.mark.parametrize("case", BACKEND_CLOSES, ids=lambda c: str(c.code))
def test_a_backend_close_is_passed_to_the_client(case: CloseCase) -> None:
    ending = backend_closed(case.code, case.reason)
    assert ending.closer is Closer.BACKEND
    assert ending.to_client == case.to_other
    assert ending.to_backend is None
    expected = Outcome.FAILED_MIDSTREAM if case.backend_failed else Outcome.COMPLETED
    assert ending.outcome is expected


def test_the_gateway_closes_both_sides_alike() -> None:
    for ending, code in ((SHUTDOWN, 1001), (too_big(100), 1009), (idle_ending("client", 5), 1001)):
        assert ending.closer is Closer.GATEWAY
        assert ending.to_client == ending.to_backend
        assert ending.to_client is not None and ending.to_client.code == code
    assert idle_ending("backend", 2.5).reason == "backend idle for 2.5 s"


def test_a_reason_too_long_for_a_close_frame_is_cut_on_a_character_boundary() -> None:
    close = backend_closed(4000, "é" * 100).to_client
    assert close is not None
    assert len(close.reason.encode()) <= MAX_REASON_BYTES
    assert close.reason == "é" * (MAX_REASON_BYTES // 2)
