"""One try of one request on one backend: connect, first byte, commit, stream body, finish.

The phase driver (ntonix.proxy) calls `attempt` once per backend it tries; this module owns
what happens between a slot taken and a slot released.

Invariants this module owns:
- Until commit (the response's head written towards the client), a failure is returned for
  the driver to retry elsewhere; after it, the error goes into the client's stream and the
  attempt never returns one, so a committed stream is never replayed on another backend.
- A retryable answer (5xx, 429) is passed over only when another eligible, untried backend
  exists and this is not the last try: otherwise the client gets the backend's own answer.
- Every attempt, however it ends (cancellation included), checks its connection back in,
  charges what passed of a metered response, tells the load book it finished and releases
  its slot with a `Report` (ntonix.backend_slots).
- The idle timeout covers only the wait for the backend, never the write to the client.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import trio

from ntonix.asgi import Scope
from ntonix.backend_slots import charge, release
from ntonix.core.framing import stream_kind
from ntonix.core.headers import client_response_headers, upstream_request_headers
from ntonix.core.health import Outcome, Ticket, outcome_of_status, retry_after_of
from ntonix.core.usage import UsageMeter, prompt_estimate_of
from ntonix.downstream import Downstream
from ntonix.errors import GatewayError, upstream_error
from ntonix.exchange import Exchange, Report, ResponseSink
from ntonix.upstream import BackendPool, UpstreamConnection
from ntonix.watchdog import IdleWatch

if TYPE_CHECKING:
    from ntonix.proxy import Proxy

# The driver's logger: a request's failures, whichever phase saw them, under one name.
log = logging.getLogger("ntonix.proxy")

_RETRYABLE = frozenset({Outcome.UPSTREAM_5XX, Outcome.UPSTREAM_429})


async def attempt(
    proxy: Proxy, ticket: Ticket, exchange: Exchange, *, last: bool
) -> GatewayError | None:
    """One try on one backend: connect, first byte, commit, stream body, finish.

    Returns the error to retry elsewhere when nothing reached the client, None when the
    client has its answer (a success, or an error already written into its stream).
    """
    settings = proxy.settings
    pool = proxy.pools[ticket.name]
    report = Report()
    connection: UpstreamConnection | None = None
    try:
        connection = pool.checkout_idle()
        if connection is None:
            with trio.move_on_after(settings.upstream_connect_timeout):
                connection = await pool.connect()
            if connection is None:
                report.outcome = Outcome.TIMED_OUT
                timeout = settings.upstream_connect_timeout
                error = upstream_error(
                    504,
                    "backend_connect_timeout",
                    f"Connecting to backend {ticket.name} timed out after {timeout} s",
                )
                report.error = error.message
                return error
        if isinstance(exchange.downstream, Downstream):  # a shared flight outlives a client
            exchange.downstream.on_gone = connection.close
        sent_at = trio.current_time()
        with trio.move_on_after(settings.first_byte_timeout) as waiting:
            await connection.send_request(
                exchange.method,
                pool.backend.base_path.encode() + exchange.request.target,
                _upstream_headers(exchange, pool),
                exchange.body,
            )
            proxy.loads.sent(ticket.name, ticket.id, trio.current_time())
            response = await connection.receive_response()
        if waiting.cancelled_caught:
            report.outcome = Outcome.TIMED_OUT
            timeout = settings.first_byte_timeout
            error = upstream_error(
                504,
                "backend_timeout",
                f"Backend {ticket.name} sent no response: timed out after {timeout} s",
            )
            report.error = error.message
            return error
        report.ttfb = trio.current_time() - sent_at
        status = response.status_code
        answered = outcome_of_status(status)
        if answered is Outcome.UPSTREAM_429:
            report.retry_after = retry_after_of(response.headers)
        if answered in _RETRYABLE and not last and _has_alternative(proxy, exchange):
            report.outcome = answered
            return upstream_error(502, "backend_error", f"Backend {ticket.name} answered {status}")
        if 200 <= status < 300 and exchange.metered:
            exchange.meter = UsageMeter(
                stream_kind(response.headers),
                strip=exchange.strip,
                prompt=partial(prompt_estimate_of, exchange.body),
            )
        await exchange.downstream.start(
            status,
            client_response_headers(response.headers, backend=ticket.name.encode()),
            body_follows=connection.body_complete(),  # `relay_body` writes it at once
        )
        try:
            first_data_at = await relay_body(
                connection,
                exchange.downstream,
                settings.idle_timeout,
                ticket.name,
                proxy.idle_watch,
                exchange.meter,
                partial(charge, proxy, exchange),
            )
            if first_data_at is not None and exchange.request.stream:
                report.first_data = first_data_at - sent_at
        except GatewayError as error:
            report.outcome = Outcome.FAILED_MIDSTREAM
            report.error = error.message
            log.warning("request %s: %s", exchange.downstream.request_id.decode(), error.message)
            await exchange.downstream.fail(error)
        else:
            report.outcome = answered
        return None
    except GatewayError as error:
        gateways = error.source == "gateway"  # out of descriptors: not the backend's fault
        report.outcome = Outcome.GATEWAY_FAILED if gateways else Outcome.CONNECT_FAILED
        report.error = error.message
        return error
    finally:
        if connection is not None:
            if isinstance(exchange.downstream, Downstream):
                exchange.downstream.on_gone = None
            pool.checkin(connection)
        if exchange.meter is not None and not exchange.charged:
            charge(proxy, exchange)  # cut short: what passed, estimated
        proxy.loads.finished(ticket.name, ticket.id, trio.current_time())
        if report.outcome is Outcome.COMPLETED and report.first_data is not None:
            proxy.loads.observe_ttfb(ticket.name, exchange.request.model, report.first_data)
        release(proxy, ticket, report)


async def relay_body(
    connection: UpstreamConnection,
    downstream: ResponseSink,
    idle_timeout: float,
    backend: str,
    watch: IdleWatch,
    meter: UsageMeter | None = None,
    charge: Callable[[], None] | None = None,
) -> float | None:
    """Phase stream body: each upstream read goes to the client as soon as it arrives.

    Returns when the first body bytes arrived (None for an empty body). The idle timeout covers
    only the wait for the backend: the write to the client is outside it, so a slow reader is
    back-pressure (the socket fills up), not a backend timeout. The worker's `IdleWatch` keeps
    it: per chunk, this only notes until when the backend may be silent (no timer per chunk);
    a body that is already complete when the relay begins is not watched at all.
    The `meter` reads the tokens on the way (and may hold back an event it strips); `charge`
    runs once the body is complete, before its end reaches the client, so that whoever waits
    for that end finds the tokens counted.
    """
    if connection.body_complete():
        # A short answer came whole with its head: nothing to wait for, so no idle timer.
        data, _ = await connection.receive_body()
        first_data_at = trio.current_time() if data else None
        if meter is not None:
            data = meter.feed(data) + meter.flush()
            if charge is not None:
                charge()
        await downstream.write(data, more=False)
        return first_data_at
    first_data_at = None
    with trio.CancelScope() as idle:
        silence = watch.watch(idle)
        try:
            while True:
                silence.expires = trio.current_time() + idle_timeout
                data, done = await connection.receive_body()
                silence.expires = math.inf
                if idle.cancel_called:
                    break  # the watch fired as the data came: the backend was silent too long
                if data and first_data_at is None:
                    first_data_at = trio.current_time()
                if meter is not None:
                    data = meter.feed(data)
                    if done:
                        data += meter.flush()
                        if charge is not None:
                            charge()
                if data or done:
                    await downstream.write(data, more=not done)
                if done:
                    return first_data_at
        finally:
            watch.forget(silence)
    raise upstream_error(
        504, "backend_idle_timeout", f"Backend {backend} sent nothing for {idle_timeout:g} s"
    )


def _has_alternative(proxy: Proxy, exchange: Exchange) -> bool:
    now = trio.current_time()
    return any(
        name not in exchange.tried for name in proxy.health.eligible(exchange.request.model, now)
    )


def _upstream_headers(exchange: Exchange, pool: BackendPool) -> list[tuple[bytes, bytes]]:
    scope = exchange.scope
    return upstream_request_headers(
        scope["headers"],
        host=pool.backend.host_header,
        body_length=len(exchange.body)
        if exchange.body or scope["method"] in ("POST", "PUT", "PATCH")
        else None,
        client_address=_client_address(scope),
        scheme=scope["scheme"].encode(),
        request_id=exchange.downstream.request_id,
        api_key=pool.backend.api_key,
    )


def _client_address(scope: Scope) -> bytes:
    client = scope.get("client")
    return client[0].encode() if client else b"unknown"
