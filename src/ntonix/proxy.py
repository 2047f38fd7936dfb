"""The life of a proxied request: one driver runs the phases in order (docs/flow.md).

accept -> pick upstream -> admission -> connect -> first byte -> commit -> stream body -> finish.
Each phase is a small function; the driver owns their timeouts. Until commit, a failure becomes a
JSON error response; after it, the stream ends with an explicit error frame (or an abort), never
a clean end that looks like success.
"""

from __future__ import annotations

import logging
import math
import os

import trio

from ntonix.asgi import Receive, Scope, Send, send_body
from ntonix.config import Config
from ntonix.core.balancer import RoundRobin
from ntonix.core.framing import StreamKind, stream_error_frame, stream_kind
from ntonix.core.headers import client_response_headers, request_id_of, upstream_request_headers
from ntonix.core.requests import ProxiedRequest, classify
from ntonix.errors import GatewayError, client_error, upstream_error
from ntonix.upstream import BackendPool, UpstreamConnection

log = logging.getLogger("ntonix.proxy")


class ClientGone(Exception):
    """The client disconnected before the gateway answered: nobody waits for a response."""


class Downstream:
    """The response towards the client: committed once, then body chunks, then one end."""

    __slots__ = ("_send", "committed", "finished", "kind", "request_id", "tail")

    def __init__(self, send: Send, request_id: bytes) -> None:
        self._send = send
        self.request_id = request_id
        self.committed = False
        self.finished = False
        self.kind = StreamKind.OTHER
        self.tail = b""

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.kind = stream_kind(headers)
        if self.kind is StreamKind.SSE:
            # An nginx in front must not buffer the stream either.
            headers.append((b"x-accel-buffering", b"no"))
        self.committed = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, data: bytes, *, more: bool) -> None:
        if data:
            self.tail = data[-4:]
        # Set before the send: Hypercorn reports the end of a response as a disconnect from
        # inside this very send, and that one must not cancel Hypercorn's own bookkeeping.
        self.finished = not more
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def fail(self, error: GatewayError) -> None:
        """Tell the client: a JSON error before commit, an error frame after it."""
        if not self.committed:
            self.committed = True
            headers = [*error.headers(), (b"x-request-id", self.request_id)]
            await send_body(self._send, error.status, error.body(), headers)
            return
        frame = stream_error_frame(self.kind, self.tail, error.payload())
        if frame is not None:
            await self.write(frame, more=False)
        # Else return without ending the body: Hypercorn then closes the connection mid-body,
        # which every HTTP client reports as an error.


class Proxy:
    """Forwards /v1/ and /api/ requests to the backends through per-backend pools."""

    def __init__(self, config: Config, pools: dict[str, BackendPool]) -> None:
        self.config = config
        self.pools = pools
        self._settings = config.gateway
        self._balancer = RoundRobin()
        self._pool_list = list(pools.values())

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one request through every phase; returns when the client has its answer."""
        downstream = Downstream(send, request_id_of(scope["headers"]) or new_request_id())
        try:
            body = await self.accept(scope, receive)
            request = classify(
                scope["method"].encode(), scope["raw_path"], scope["query_string"], body
            )
        except ClientGone:
            return
        except GatewayError as error:
            await downstream.fail(error)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_disconnect, receive, downstream, nursery.cancel_scope)
            try:
                await self.forward(scope, request, body, downstream)
            except GatewayError as error:
                log.warning("request %s failed: %s", downstream.request_id.decode(), error.message)
                await downstream.fail(error)
            nursery.cancel_scope.cancel()

    async def accept(self, scope: Scope, receive: Receive) -> bytes:
        """Phase accept: the whole request body, within `max_request_body` and `body_timeout`."""
        limit = self._settings.max_request_body
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise _too_large(limit)
        with trio.move_on_after(self._settings.body_timeout) as reading:
            return await read_body(receive, limit)
        assert reading.cancelled_caught
        raise client_error(408, "request_timeout", "The request body did not arrive in time")

    async def forward(
        self, scope: Scope, request: ProxiedRequest, body: bytes, downstream: Downstream
    ) -> None:
        """Phases pick upstream and admission, then the exchange with one backend."""
        pool = self._balancer.order(self._pool_list)[0]
        if pool.limited:
            with trio.move_on_after(self._settings.queue_timeout) as queued:
                await pool.acquire_slot()
            if queued.cancelled_caught:
                raise GatewayError(
                    503,
                    "backend_busy",
                    f"Backend {pool.backend.name} is at max_concurrent",
                    source="gateway",
                    retry_after=1,
                )
        try:
            await self.exchange(pool, scope, request, body, downstream)
        finally:
            pool.release_slot()

    async def exchange(
        self,
        pool: BackendPool,
        scope: Scope,
        request: ProxiedRequest,
        body: bytes,
        downstream: Downstream,
    ) -> None:
        """Phases connect, first byte, commit and stream body on one backend connection."""
        settings = self._settings
        backend = pool.backend
        connection = pool.checkout_idle()
        if connection is None:
            with trio.move_on_after(settings.upstream_connect_timeout):
                connection = await pool.connect()
            if connection is None:
                raise upstream_error(
                    504,
                    "backend_connect_timeout",
                    f"Connecting to backend {backend.name} timed out",
                )
        try:
            headers = upstream_request_headers(
                scope["headers"],
                host=backend.host_header,
                body_length=len(body)
                if body or scope["method"] in ("POST", "PUT", "PATCH")
                else None,
                client_address=_client_address(scope),
                scheme=scope["scheme"].encode(),
                request_id=downstream.request_id,
                api_key=backend.api_key,
            )
            target = backend.base_path.encode() + request.target
            with trio.move_on_after(settings.first_byte_timeout) as waiting:
                await connection.send_request(scope["method"].encode(), target, headers, body)
                response = await connection.receive_response()
            if waiting.cancelled_caught:
                raise upstream_error(
                    504, "backend_timeout", f"Backend {backend.name} sent no response in time"
                )
            await downstream.start(
                response.status_code,
                client_response_headers(
                    response.headers,
                    backend=backend.name.encode(),
                    request_id=downstream.request_id,
                ),
            )
            await relay_body(connection, downstream, settings.idle_timeout, backend.name)
        finally:
            pool.checkin(connection)


async def relay_body(
    connection: UpstreamConnection, downstream: Downstream, idle_timeout: float, backend: str
) -> None:
    """Phase stream body: each upstream read goes to the client as soon as it arrives.

    The idle deadline covers only the wait for the backend: the write to the client is outside
    it, so a slow reader is back-pressure (the socket fills up), not a backend timeout.
    """
    with trio.CancelScope() as idle:
        while True:
            idle.deadline = trio.current_time() + idle_timeout
            data, done = await connection.receive_body()
            idle.deadline = math.inf
            await downstream.write(data, more=not done)
            if done:
                return
    raise upstream_error(
        504, "backend_idle_timeout", f"Backend {backend} sent nothing for {idle_timeout:g} s"
    )


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, refusing it as soon as it grows past `limit`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def cancel_on_disconnect(
    receive: Receive, downstream: Downstream, scope: trio.CancelScope
) -> None:
    """Watch for the client leaving; then cancel its request so the upstream closes at once.

    Hypercorn reports a disconnect only to a task blocked in receive(), never through send().
    """
    while (await receive())["type"] != "http.disconnect":
        pass
    if not downstream.finished:
        scope.cancel()


def new_request_id() -> bytes:
    return os.urandom(12).hex().encode()


def _client_address(scope: Scope) -> bytes:
    client = scope.get("client")
    return client[0].encode() if client else b"unknown"


def _too_large(limit: int) -> GatewayError:
    return client_error(413, "request_too_large", f"The request body is larger than {limit} bytes")
