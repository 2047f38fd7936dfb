"""Which headers cross the gateway, in each direction.

Invariants: hop-by-hop headers (RFC 9110 section 7.6.1, plus any named in `Connection`) never
cross; the client's credentials never reach a backend; framing headers are the gateway's own
(it re-frames the body it read).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the gateway itself on the way up; the client's values are not trusted as-is.
_REPLACED_UPSTREAM = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"authorization",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
}
# Hypercorn writes its own Date and Server; forwarding the backend's would duplicate them.
_REPLACED_DOWNSTREAM = HOP_BY_HOP | {b"date", b"server"}


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return frozenset(tokens)


def _strip(headers: Sequence[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> Headers:
    named = _connection_tokens(headers)
    if named:
        dropped = dropped | named
    return [(name, value) for name, value in headers if name not in dropped]


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"x-request-id":
            return value if 0 < len(value) <= 200 else None
    return None


def upstream_request_headers(
    client_headers: Sequence[tuple[bytes, bytes]],
    *,
    host: bytes,
    body_length: int | None,
    client_address: bytes,
    scheme: bytes,
    request_id: bytes,
    api_key: str,
) -> Headers:
    """Headers for the upstream request: the client's end-to-end ones plus the proxy's own."""
    headers = _strip(client_headers, _REPLACED_UPSTREAM)
    forwarded_for = client_address
    client_host = b""
    for name, value in client_headers:
        if name == b"x-forwarded-for":
            forwarded_for = value + b", " + client_address
        elif name == b"host":
            client_host = value
    headers.append((b"host", host))
    if body_length is not None:
        headers.append((b"content-length", str(body_length).encode()))
    headers.append((b"x-forwarded-for", forwarded_for))
    headers.append((b"x-forwarded-proto", scheme))
    if client_host:
        headers.append((b"x-forwarded-host", client_host))
    headers.append((b"x-request-id", request_id))
    if api_key:
        headers.append((b"authorization", b"Bearer " + api_key.encode()))
    return headers


def client_response_headers(
    upstream_headers: Sequence[tuple[bytes, bytes]], *, backend: bytes
) -> Headers:
    """Headers for the client: the backend's end-to-end ones and which backend answered
    (the request's own, such as x-request-id, are added when it commits)."""
    headers = _strip(upstream_headers, _REPLACED_DOWNSTREAM)
    headers.append((b"x-ntonix-backend", backend))
    return headers
