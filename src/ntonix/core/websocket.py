"""WebSocket sessions: what a session needs decided, without any I/O.

Invariants: a session's model comes only from its `?model=` query parameter (as the Realtime
API passes it); the backend's handshake never carries the client's credentials or the client's
own handshake headers (the gateway's client library writes those), only the end-to-end headers
the HTTP hygiene rules let through; a close code sent on is always one a peer may send (RFC 6455
section 7.4: never 1005, 1006 or 1015), and a side that vanished without a close frame is
reported to the other as 1011 (the backend is gone) or 1001 (the client is gone); every session
ends with exactly one `Ending`, which names who closed it.
"""

from __future__ import annotations

import enum
import urllib.parse
from collections.abc import Sequence

import attrs

from ntonix.core.headers import Headers, client_response_headers, upstream_request_headers
from ntonix.core.health import Outcome

NORMAL = 1000
GOING_AWAY = 1001
TOO_BIG = 1009
INTERNAL_ERROR = 1011
# Codes a peer reports but must never put in a close frame: no status, abnormal, TLS failure.
NO_STATUS = 1005
ABNORMAL = 1006
_LOCAL_ONLY = frozenset({NO_STATUS, ABNORMAL, 1015})
# The client library and the server write these themselves on each leg of the session.
_HANDSHAKE = frozenset(
    {
        b"host",
        b"content-length",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
MAX_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes, 2 of them the code


def session_model(query_string: bytes) -> str | None:
    """The model a session asks for (`?model=`, the first one), None when it names none."""
    for name, value in urllib.parse.parse_qsl(query_string.decode("latin-1")):
        if name == "model" and value:
            return value
    return None


def upstream_handshake_headers(
    client_headers: Sequence[tuple[bytes, bytes]],
    *,
    client_address: bytes,
    scheme: bytes,
    request_id: bytes,
    api_key: str,
) -> Headers:
    """Extra headers of the backend's handshake: the HTTP rules (no hop-by-hop headers, the
    backend's `api_key` in place of the client's credentials, X-Forwarded-*), minus what the
    WebSocket client writes itself (Host, the Sec-WebSocket-* headers)."""
    headers = upstream_request_headers(
        client_headers,
        host=b"",
        body_length=None,
        client_address=client_address,
        scheme=b"https" if scheme == b"wss" else b"http",
        request_id=request_id,
        api_key=api_key,
    )
    return [(name, value) for name, value in headers if name not in _HANDSHAKE]


def client_accept_headers(
    backend_headers: Sequence[tuple[bytes, bytes]], *, backend: bytes, request_id: bytes
) -> Headers:
    """Headers of the client's handshake answer: the backend's end-to-end ones, which backend
    took the session and the request id."""
    headers = client_response_headers(backend_headers, backend=backend)
    headers = [(name, value) for name, value in headers if name not in _HANDSHAKE]
    headers.append((b"x-request-id", request_id))
    return headers


class Closer(enum.Enum):
    """Who ended a session."""

    CLIENT = "client"
    BACKEND = "backend"
    GATEWAY = "gateway"  # idle timeout, shutdown, a message over the size limit


@attrs.frozen
class Close:
    """A close frame to send: a code a peer may send and a reason that fits the frame."""

    code: int
    reason: str = ""

    @classmethod
    def of(cls, code: int, reason: str) -> Close:
        encoded = reason.encode()
        if len(encoded) > MAX_REASON_BYTES:
            reason = encoded[:MAX_REASON_BYTES].decode(errors="ignore")
        return cls(code, reason)


@attrs.frozen
class Ending:
    """How a session ended: who closed it, with what, and what each side is sent (None: that
    side is gone and is sent nothing)."""

    closer: Closer
    code: int  # as the closing side reported it (1006: it vanished without a close frame)
    reason: str
    to_client: Close | None
    to_backend: Close | None
    backend_failed: bool = False  # the health table hears a failure

    @property
    def outcome(self) -> Outcome:
        """What the session tells the health table about its backend."""
        return Outcome.FAILED_MIDSTREAM if self.backend_failed else Outcome.COMPLETED


def client_closed(code: int, reason: str) -> Ending:
    """The client closed (or vanished: 1006): the backend gets the same code and reason, or
    1001 "client gone" when there was no close frame to copy."""
    if code in _LOCAL_ONLY:
        to_backend = Close(NORMAL) if code == NO_STATUS else Close(GOING_AWAY, "client gone")
    else:
        to_backend = Close.of(code, reason)
    return Ending(Closer.CLIENT, code, reason, to_client=None, to_backend=to_backend)


def backend_closed(code: int, reason: str) -> Ending:
    """The backend closed (or vanished: 1006): the client gets the same code and reason, or
    1011 "backend gone". A backend that vanished or closed with 1011 failed, for its health."""
    if code in _LOCAL_ONLY:
        to_client = Close(NORMAL) if code == NO_STATUS else Close(INTERNAL_ERROR, "backend gone")
    else:
        to_client = Close.of(code, reason)
    failed = code in (ABNORMAL, 1015, INTERNAL_ERROR)
    return Ending(
        Closer.BACKEND, code, reason, to_client=to_client, to_backend=None, backend_failed=failed
    )


def gateway_closed(code: int, reason: str) -> Ending:
    """The gateway ends the session (idle timeout, shutdown, a message too big): both sides
    get the same close."""
    close = Close.of(code, reason)
    return Ending(Closer.GATEWAY, code, reason, to_client=close, to_backend=close)


def idle_ending(quiet: str, idle_timeout: float) -> Ending:
    """`quiet` ("client" or "backend") said nothing for `idle_timeout` seconds."""
    return gateway_closed(GOING_AWAY, f"{quiet} idle for {idle_timeout:g} s")


SHUTDOWN = gateway_closed(GOING_AWAY, "gateway shutting down")


def too_big(limit: int) -> Ending:
    return gateway_closed(TOO_BIG, f"message larger than {limit} bytes")
