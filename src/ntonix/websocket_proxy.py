"""WebSocket sessions on /v1/* and /api/* (the Realtime API): one client, one backend, a relay.

The phases of a session, in order:
gate (key, limits, route, `?model=`) -> pick + connect (the client's handshake waits; a backend
that refuses or cannot be reached is reported and the next one is tried) -> accept -> relay ->
close -> finish (one outcome to the health table, one access-log line, the tallies).

Who cancels whom: the session's nursery holds the upstream connection's task (trio-websocket's
reader lives in a nursery of that task, so a refused handshake fails that task's start, never the
session). The relay runs in a nursery of its own inside it: the client pump, the backend pump,
the idle watchdog, the pinger and the shutdown watcher. The first of them to see the session end
records the `Ending` and cancels the relay nursery; the session then sends the closes the ending
names (the client's through ASGI, the backend's close handshake under `CLOSE_TIMEOUT`) and
cancels its own nursery, which closes the upstream socket. A cancellation from outside (the
client's connection cancelled at the end of the drain) takes the same exits: the socket is
closed and the outcome is still reported.

The relay itself (the pumps and watchers, the closes) is `websocket_relay.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from trio_websocket import (
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from ntonix.accesslog import AccessLog
from ntonix.asgi import Receive, Scope, Send
from ntonix.backend_slots import admit, release
from ntonix.core.headers import request_id_of
from ntonix.core.health import Outcome, Ticket, outcome_of_status
from ntonix.core.requests import validate_target
from ntonix.core.sessions import SessionCounts, SessionTallies
from ntonix.core.telemetry import RequestRecord
from ntonix.core.websocket import (
    ABNORMAL,
    Ending,
    client_accept_headers,
    client_closed,
    session_model,
    upstream_handshake_headers,
)
from ntonix.downstream import new_request_id
from ntonix.errors import GatewayError, client_error, dialect_of, upstream_error
from ntonix.exchange import Report
from ntonix.proxy import Proxy
from ntonix.shared_limits import Ticket as ClientTicket
from ntonix.upstream import BackendPool
from ntonix.websocket_relay import Relay, close_session, scope_pings

log = logging.getLogger("ntonix.websocket")

CLIENT_LEFT = 499  # the access log's status for a client gone before its answer (nginx's code)
# Messages trio-websocket queues from the backend before it stops reading (back-pressure).
UPSTREAM_QUEUE = 1

# Admission by key and limits, the same as HTTP's (app.py): on the shared tier when there is one.
AdmitClient = Callable[[Scope, RequestRecord], Awaitable["ClientTicket | GatewayError"]]


class Refusal(Exception):
    """The HTTP answer that refuses a client's handshake (ours, or a backend's passed on)."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers
        self.body = body

    @classmethod
    def of(cls, error: GatewayError, record: RequestRecord) -> Refusal:
        """Our error in the dialect of the route asked for (Ollama's shape on /api/)."""
        return cls(error.status, error.headers(), error.body(dialect_of(record.path)))


class Placement:
    """A session looking for a backend (what `backend_slots.admit` needs to know)."""

    __slots__ = ("affinity", "model", "record", "tried")

    def __init__(self, model: str, record: RequestRecord) -> None:
        self.model: str | None = model
        self.record = record
        self.tried: set[str] = set()
        self.affinity: str | None = None


class Sessions:
    """Serves the WebSocket upgrades the gateway proxies."""

    def __init__(
        self,
        proxy: Proxy,
        *,
        admit_client: AdmitClient,
        release_client: Callable[[ClientTicket], None],
        tallies: SessionTallies,
        access_log: AccessLog,
        stopping: trio.Event,
    ) -> None:
        self.proxy = proxy
        self._admit_client = admit_client
        self._release_client = release_client
        self.tallies = tallies
        self._access_log = access_log
        self._stopping = stopping

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One ASGI websocket connection, from `websocket.connect` to its access-log line."""
        client = scope.get("client")
        record = RequestRecord(
            started=trio.current_time(),
            wall_time=time.time(),
            request_id=request_id_of(scope["headers"]) or new_request_id(),
            client=client[0] if client else "unknown",
            method="GET",
            path=scope["path"],
            cache="",
        )
        counts = record.session = SessionCounts()
        try:
            await self._gate(scope, receive, send, record)
        finally:
            now = trio.current_time()
            self.tallies.finish(
                backend=record.backend,
                status=record.status,
                counts=counts,
                bytes_in=record.bytes_in,
                bytes_out=record.bytes_out,
                duration=now - record.started,
            )
            self._access_log.write(record, now)

    async def _gate(
        self, scope: Scope, receive: Receive, send: Send, record: RequestRecord
    ) -> None:
        """Phase gate: the same key and limits as HTTP, then the route and the model."""
        if (await receive())["type"] != "websocket.connect":
            record.outcome, record.status = "client_disconnected", CLIENT_LEFT
            return
        admitted = await self._admit_client(scope, record)
        if isinstance(admitted, GatewayError):
            await refuse(scope, send, record, Refusal.of(admitted, record), admitted.code)
            return
        try:
            try:
                target = validate_target(scope["raw_path"], scope["query_string"])
                model = session_model(scope["query_string"])
                if model is None:
                    raise client_error(
                        400, "model_required", "A WebSocket session needs ?model= in its URL"
                    )
                if not admitted.tenant.may_use(model):
                    message = f"The key {admitted.tenant.name!r} may not use the model {model!r}"
                    raise client_error(403, "model_not_allowed", message)
                if self._stopping.is_set():
                    raise GatewayError(
                        503, "shutting_down", "The gateway is shutting down", source="gateway"
                    )
            except GatewayError as error:
                await refuse(scope, send, record, Refusal.of(error, record), error.code)
                return
            record.model = model
            await self._session(scope, receive, send, record, target)
        finally:
            self._release_client(admitted)

    async def _session(
        self, scope: Scope, receive: Receive, send: Send, record: RequestRecord, target: bytes
    ) -> None:
        settings = self.proxy.config.websocket
        upstream: WebSocketConnection | None = None
        async with trio.open_nursery() as session:
            try:
                with trio.CancelScope() as waiting:
                    watch = trio.CancelScope()
                    session.start_soon(_cancel_if_client_leaves, receive, waiting, watch, record)
                    ticket, upstream, report = await self._connect(
                        session, scope, record, target, settings.max_message_size
                    )
                    watch.cancel()
            except Refusal as refusal:
                await refuse(scope, send, record, refusal, "backend_refused")
            except GatewayError as error:
                await refuse(scope, send, record, Refusal.of(error, record), error.code)
            if upstream is None:  # refused, or the client left while its handshake waited
                session.cancel_scope.cancel()
                return
            try:
                if waiting.cancel_called:  # the client left just as the backend accepted
                    ending = client_closed(ABNORMAL, "")
                    assert record.session is not None
                    await close_session(ending, send, upstream, record.session)
                else:
                    ending = await self._relay(scope, receive, send, record, upstream)
                report.outcome = ending.outcome
                if ending.backend_failed:
                    report.error = f"the session's backend closed it with {ending.code}"
                    record.outcome, record.error = "error", "backend_gone"
            finally:
                release(self.proxy, ticket, report)
                session.cancel_scope.cancel()

    async def _connect(
        self,
        session: trio.Nursery,
        scope: Scope,
        record: RequestRecord,
        target: bytes,
        max_message_size: int,
    ) -> tuple[Ticket, WebSocketConnection | None, Report]:
        """Phase pick + connect: the first backend to accept the handshake, failing over while
        the client's own handshake waits. Raises the `Refusal` or `GatewayError` to answer."""
        proxy = self.proxy
        placement = Placement(record.model or "", record)
        tallies = proxy.tallies
        last_error: GatewayError | None = None
        failed = ""
        retries = proxy.config.gateway.retries
        for attempt in range(retries + 1):
            ticket = await admit(proxy, placement, first=attempt == 0)
            if ticket is None:
                break
            if failed:
                tallies.retries[failed] += 1
            placement.tried.add(ticket.name)
            record.backend, record.retries = ticket.name, attempt
            pool = proxy.pools[ticket.name]
            report = Report()
            hold = partial(
                _hold_upstream,
                pool,
                scope,
                target,
                upstream_handshake_headers(
                    scope["headers"],
                    client_address=record.client.encode(),
                    scheme=scope["scheme"].encode(),
                    request_id=record.request_id,
                    api_key=pool.backend.api_key,
                ),
                max_message_size,
            )
            released = True
            try:
                with trio.move_on_after(proxy.config.gateway.upstream_connect_timeout):
                    sent_at = trio.current_time()
                    upstream: WebSocketConnection = await session.start(hold)
                    report.ttfb = trio.current_time() - sent_at
                    if failed:
                        tallies.failovers[ticket.name] += 1
                    released = False
                    return ticket, upstream, report
                report.outcome = Outcome.TIMED_OUT
                last_error = upstream_error(
                    504, "backend_connect_timeout", f"Backend {ticket.name} did not accept in time"
                )
            except Refusal as refusal:
                report.outcome = outcome_of_status(refusal.status)
                report.error = f"refused the WebSocket handshake with {refusal.status}"
                log.warning(
                    "session %s: backend %s %s",
                    record.request_id.decode(),
                    ticket.name,
                    report.error,
                )
                if report.outcome is Outcome.UPSTREAM_4XX or attempt == retries:
                    raise
                last_error = upstream_error(502, "backend_refused", report.error)
            except GatewayError as error:
                report.outcome = Outcome.CONNECT_FAILED
                report.error = error.message
                log.warning("session %s: %s", record.request_id.decode(), error.message)
                last_error = error
            finally:
                if released:
                    release(proxy, ticket, report)
            failed = ticket.name
        assert last_error is not None  # a first attempt either returns or raises
        raise last_error

    async def _relay(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord,
        upstream: WebSocketConnection,
    ) -> Ending:
        """Phases accept, relay and close; how the session ended."""
        settings = self.proxy.config.websocket
        counts = record.session
        assert counts is not None
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": upstream.subprotocol,
                "headers": client_accept_headers(
                    upstream.handshake_headers,
                    backend=record.backend.encode(),
                    request_id=record.request_id,
                ),
            }
        )
        record.status = 101
        record.first_byte_at = trio.current_time()  # ttfb_ms: until the session was open
        self.tallies.active += 1
        pings = scope_pings(scope)
        relay = Relay(record, counts, settings.max_message_size, settings.idle_timeout, pings)
        try:
            async with trio.open_nursery() as pumps:
                relay.nursery = pumps
                pumps.start_soon(relay.client_to_backend, receive, upstream)
                pumps.start_soon(relay.backend_to_client, upstream, send)
                pumps.start_soon(relay.watch_idle)
                if settings.ping_interval:
                    pumps.start_soon(relay.ping, upstream, settings.ping_interval)
                graceful = self.proxy.config.gateway.graceful_timeout
                pumps.start_soon(relay.close_on_shutdown, self._stopping, graceful)
            ending = relay.ending
            assert ending is not None
            await close_session(ending, send, upstream, counts)
            return ending
        finally:
            self.tallies.active -= 1


async def _hold_upstream(
    pool: BackendPool,
    scope: Scope,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    max_message_size: int,
    *,
    task_status: trio.TaskStatus[WebSocketConnection],
) -> None:
    """Open the backend's connection and handshake, report the connection, then keep its
    reader running until cancelled; the socket is closed on the way out, however that is."""
    backend = pool.backend
    stream = await pool.open_stream()
    try:
        async with trio.open_nursery() as reader:
            upstream = await wrap_client_stream(
                reader,
                stream,
                backend.host_header.decode(),
                backend.base_path + target.decode("latin-1"),
                subprotocols=scope.get("subprotocols") or None,
                extra_headers=headers,
                message_queue_size=UPSTREAM_QUEUE,
                max_message_size=max_message_size,
            )
            task_status.started(upstream)
            await trio.sleep_forever()
    except* ConnectionRejected as group:
        rejected = group.exceptions[0]
        assert isinstance(rejected, ConnectionRejected)
        headers = [
            (name, value)
            for name, value in rejected.headers or ()
            if name.lower() in (b"content-type", b"retry-after")
        ]
        raise Refusal(rejected.status_code, headers, rejected.body or b"") from None
    finally:
        await trio.aclose_forcefully(stream)


async def _cancel_if_client_leaves(
    receive: Receive, waiting: trio.CancelScope, watch: trio.CancelScope, record: RequestRecord
) -> None:
    """While the client's handshake waits for a backend, its departure cancels the wait;
    `watch` is cancelled once the wait is over (the client pump then takes `receive`)."""
    with watch:
        if (await receive())["type"] == "websocket.disconnect":
            record.outcome, record.status = "client_disconnected", CLIENT_LEFT
            waiting.cancel()


async def refuse(
    scope: Scope, send: Send, record: RequestRecord, refusal: Refusal, code: str
) -> None:
    """Refuse the handshake with an HTTP answer the client can read, when the server offers
    the ASGI `websocket.http.response` extension; else closing before accepting makes the
    server answer 403."""
    record.status = refusal.status
    record.outcome = "error"
    record.error = code
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [*refusal.headers, (b"content-length", str(len(refusal.body)).encode())]
    await send(
        {"type": "websocket.http.response.start", "status": refusal.status, "headers": headers}
    )
    await send({"type": "websocket.http.response.body", "body": refusal.body})
