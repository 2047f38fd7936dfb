"""The gateway's own routes (/ntonix/*, /metrics, the model lists) and the answers it writes.

Invariants this module owns:
- Every own route but /ntonix/health and /ntonix/ready needs the admin token when one is set;
  it is compared in constant time, and accepted outside the authorization header only for the
  dashboard (its `token` query parameter or `ntonix_admin_token` cookie).
- An unknown route is a 404 and a refused request an error in the client's dialect (OpenAI's
  or Ollama's shape), each noted on the request's record for the access log.
- /v1/models and /api/tags list what the healthy backends serve, only what the key may use.
"""

from __future__ import annotations

import hmac
import time
import urllib.parse
from typing import TYPE_CHECKING, cast

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from ntonix import dashboard, overview
from ntonix.asgi import Scope, Send, header, send_body, send_json
from ntonix.core.telemetry import RequestRecord
from ntonix.errors import Dialect, GatewayError, client_error, dialect_of
from ntonix.metrics import exposition
from ntonix.proxy import Proxy
from ntonix.tier import TierUnavailable

if TYPE_CHECKING:
    from ntonix.app import Gateway

# Gateway routes anyone may call, even when an admin token is set: load balancers poll them.
_OPEN_ROUTES = frozenset({b"/ntonix/health", b"/ntonix/ready"})
MODEL_LISTS = frozenset({b"/v1/models", b"/api/tags"})
_DASHBOARD_CSP = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"img-src data:; connect-src 'self'; frame-ancestors 'none'"
)


async def serve_own_route(
    gateway: Gateway, scope: Scope, send: Send, record: RequestRecord
) -> None:
    """Answer a request for one of the gateway's own routes, or refuse it (401, 404)."""
    path = scope["raw_path"]
    method = scope["method"]
    if path not in _OPEN_ROUTES and not admin_allowed(scope, gateway.config.auth.admin_token):
        error = client_error(401, "invalid_admin_token", "Admin token required")
        await refuse(send, record, error)
    elif path == b"/ntonix/health" and method == "GET":
        await send_json(send, 200, {"status": "ok"})
    elif path == b"/ntonix/ready" and method == "GET":
        ready = gateway.ready()
        await send_json(send, 200 if ready else 503, {"ready": ready})
    elif path == b"/metrics" and method == "GET" and (figures := await gateway.figures()):
        body = exposition(figures)
        await send_body(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])
    elif path == b"/ntonix/status" and method == "GET":
        await send_json(send, 200, await gateway.status())
    elif path == b"/ntonix/usage" and method == "GET" and (figures := await gateway.figures()):
        await send_json(send, 200, overview.usage(figures, time.time()))
    elif path == b"/ntonix/dashboard" and method == "GET":
        headers = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"cache-control", b"no-store"),
            # The page may talk only to this gateway, and nobody may frame it.
            (b"content-security-policy", _DASHBOARD_CSP),
            (b"x-frame-options", b"DENY"),
        ]
        await send_body(send, 200, dashboard.page(), headers)
    elif path == b"/ntonix/cache" and method == "DELETE":
        await clear_cache(gateway.proxy, send)
    elif path == b"/ntonix/reload" and method == "POST":
        problems = gateway.reload()
        await send_json(
            send, 400 if problems else 200, {"reloaded": not problems, "problems": problems}
        )
    else:
        error = client_error(404, "unknown_route", f"Unknown route: {method} {scope['path']}")
        await refuse(send, record, error)


def admin_allowed(scope: Scope, token: str) -> bool:
    """No admin token set, or the request carries it: as a Bearer token, or for the
    dashboard (a browser cannot set headers on a page load or a websocket) as the `token`
    query parameter or the `ntonix_admin_token` cookie."""
    if not token:
        return True
    if _bearer_matches(scope, token):
        return True
    if not scope["path"].startswith("/ntonix/dashboard"):
        return False
    expected = token.encode()
    offered = [
        *_query_values(scope["query_string"], b"token"),
        *_cookie_values(header(scope, b"cookie"), b"ntonix_admin_token"),
    ]
    return any(hmac.compare_digest(value, expected) for value in offered)


async def list_models(proxy: Proxy, path: bytes, send: Send, record: RequestRecord) -> None:
    """/v1/models and /api/tags: the union of what the healthy backends serve (of those,
    what the key may use)."""
    assert record.tenant is not None
    tenant = record.tenant
    served = proxy.health.served_models(trio.current_time())
    models = [model for model in served if tenant.may_use(model)]
    if path == b"/v1/models":
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "ntonix"} for m in models]
        await send_json(send, 200, {"object": "list", "data": data}, record.extra_headers)
    else:
        tags = [{"name": m, "model": m} for m in models]
        await send_json(send, 200, {"models": tags}, record.extra_headers)


async def clear_cache(proxy: Proxy | None, send: Send) -> None:
    """DELETE /ntonix/cache: this worker's L1, and with a tier every L2 entry. The other
    workers' and instances' L1 copies are not reached: they age out with the cache's TTL
    (docs/operations.md says why)."""
    cache = proxy.cache if proxy else None
    cleared = cache.clear() if cache else 0
    if cache is None or cache.shared is None:
        await send_json(send, 200, {"cleared": cleared})
        return
    try:
        shared = await cache.shared.clear()
    except TierUnavailable as error:
        message = f"This worker's cache was cleared, the shared tier's was not: {error}"
        await send_json(send, 503, {"cleared": cleared, "error": message})
        return
    await send_json(send, 200, {"cleared": cleared, "cleared_shared": shared})


def _query_values(query: bytes, name: bytes) -> list[bytes]:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return [value for key, value in pairs if key == name]


def _cookie_values(cookies: bytes, name: bytes) -> list[bytes]:
    values = []
    for pair in cookies.replace(b",", b";").split(b";"):
        key, _, value = pair.strip().partition(b"=")
        if key == name:
            values.append(value.strip(b'"'))
    return values


def _bearer_matches(scope: Scope, token: str) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return hmac.compare_digest(value, b"Bearer " + token.encode())
    return False


async def refuse(
    send: Send, record: RequestRecord, error: GatewayError, *, close: bool = False
) -> None:
    """Answer with the gateway's own error, and note it for the access log."""
    record.status = error.status
    record.outcome = "error"
    record.error = error.code
    await send_error(send, error, dialect_of(record.path), close=close, extra=record.extra_headers)


def recording(send: Send, record: RequestRecord) -> Send:
    """`send`, noting status and body bytes for a response the gateway writes itself (the
    proxied ones are noted by their Downstream)."""

    async def send_and_note(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            record.status = cast(int, message["status"])
        else:
            body = cast(bytes, message.get("body", b""))
            if body:
                record.note_body(len(body), trio.current_time)
        await send(message)

    return send_and_note


async def send_error(
    send: Send,
    error: GatewayError,
    dialect: Dialect,
    *,
    close: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """The error in the client's dialect (OpenAI's or Ollama's shape).

    `close` asks Hypercorn (h11) to close the connection after this response: for a request
    whose framing is in doubt, what follows it on the connection cannot be trusted. HTTP/1
    only: HTTP/2 forbids the header and its streams are framed by the protocol."""
    headers = error.headers()[1:] + (extra or [])
    if close:
        headers.append((b"connection", b"close"))
    await send_json(send, error.status, error.payload(dialect), headers)
