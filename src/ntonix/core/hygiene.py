"""Request hygiene: what the gateway refuses before it looks at a request's route or body.

Hypercorn (through h11 0.16) already refuses, on its own, before the app is called:
CR, LF or NUL in a header name or value, obs-fold continuation lines, a `Content-Length` whose
values differ (in one field or across fields), a `Transfer-Encoding` other than `chunked`,
two `Transfer-Encoding` fields, bad chunk framing, and a head that is still incomplete past
`h11_max_incomplete_size` (16 KiB). It lets through: any number of header fields and a head of
any size that arrives in one read, `Content-Length` together with `Transfer-Encoding`, the
absolute-form target and `CONNECT`. Those are checked here. (Repeated *identical*
`Content-Length` fields are merged into one by h11, as RFC 9110 section 8.6 allows; the check
below still refuses repeats for servers, such as HTTP/2, that pass them on.)

Invariant: a request that passes has origin-form target, at most `MAX_HEADER_FIELDS` fields,
at most `MAX_HEADER_BYTES` of header, one unambiguous body framing and a method worth proxying.
"""

from __future__ import annotations

from collections.abc import Sequence

from ntonix.errors import GatewayError, client_error

MAX_HEADER_FIELDS = 100
MAX_HEADER_BYTES = 32 * 1024
# Tunnels and loop-back diagnostics: what open proxies are abused with; an LLM API needs neither.
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
# ": " and CRLF around each field on the wire; counted so the limit means bytes on the wire.
_FIELD_OVERHEAD = 4


def check_request(
    method: str, raw_path: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> GatewayError | None:
    """None when the request may go on; else the error to answer (and close the connection
    with: after a refused head, what follows on the connection cannot be trusted)."""
    if len(headers) > MAX_HEADER_FIELDS:
        return _too_large(f"more than {MAX_HEADER_FIELDS} header fields")
    size = 0
    content_lengths = 0
    chunked = False
    for name, value in headers:
        size += len(name) + len(value) + _FIELD_OVERHEAD
        if name == b"content-length":
            content_lengths += 1
        elif name == b"transfer-encoding":
            chunked = True
    if size > MAX_HEADER_BYTES:
        return _too_large(f"more than {MAX_HEADER_BYTES} bytes of header")
    if method in REFUSED_METHODS:
        return client_error(405, "method_not_allowed", "Method not allowed")
    if content_lengths > 1:
        return client_error(400, "invalid_framing", "More than one Content-Length header")
    if content_lengths and chunked:
        # RFC 9112 section 6.1: the classic request-smuggling shape; reject, do not guess.
        return client_error(
            400, "invalid_framing", "Both Content-Length and Transfer-Encoding are present"
        )
    if not raw_path.startswith(b"/"):
        # Absolute-form (`GET http://host/x`), authority-form or asterisk-form: a gateway
        # that is not a forward proxy only ever answers origin-form targets.
        return client_error(400, "invalid_target", "The request target must be a path")
    return None


def _too_large(what: str) -> GatewayError:
    return client_error(
        431, "request_header_fields_too_large", f"Request header fields too large: {what}"
    )
