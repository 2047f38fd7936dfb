"""The life of a proxied request: one driver runs the phases in order (docs/flow.md).

accept -> pick upstream -> admission -> connect -> first byte -> commit -> stream body -> finish.
Each phase is a small function; the driver owns their timeouts. Until commit, a failure becomes a
JSON error response; after it, the stream ends with an explicit error frame (or an abort), never
a clean end that looks like success.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from functools import partial
from typing import Protocol

import attrs
import trio

from ntonix.accounts import Accounts
from ntonix.admission import Admission
from ntonix.asgi import Receive, Scope, Send, header
from ntonix.cache import Flight, ResponseCache, listen, replay
from ntonix.config import Config
from ntonix.core.balancer import affinity_key, make_strategy
from ntonix.core.framing import stream_kind
from ntonix.core.headers import client_response_headers, upstream_request_headers
from ntonix.core.health import (
    HealthTable,
    Outcome,
    Ticket,
    no_route_status,
    outcome_of_status,
    retry_after_of,
)
from ntonix.core.keys import Decision, cache_key, cacheability, scope_for
from ntonix.core.lru import CachedResponse
from ntonix.core.requests import ProxiedRequest, classify
from ntonix.core.signals import LoadBook
from ntonix.core.telemetry import RequestRecord, Tallies
from ntonix.core.usage import UsageMeter, prompt_estimate, with_stream_usage
from ntonix.downstream import (
    ClientGone,
    Downstream,
    cancelled_on_disconnect,
    client_left,
    read_body,
    too_large,
)
from ntonix.errors import GatewayError, client_error, upstream_error
from ntonix.inbox import Inbox
from ntonix.shared_flights import Follow
from ntonix.upstream import BackendPool, UpstreamConnection
from ntonix.watchdog import IdleWatch

log = logging.getLogger("ntonix.proxy")


class Proxy:
    """Forwards /v1/ and /api/ requests to healthy backends, with admission and failover."""

    def __init__(
        self,
        config: Config,
        pools: dict[str, BackendPool],
        health: HealthTable,
        cache: ResponseCache | None = None,
        tallies: Tallies | None = None,
        accounts: Accounts | None = None,
    ) -> None:
        self.health = health
        self.cache = cache
        self.tallies = tallies or Tallies()
        self.accounts = accounts or Accounts()
        self.admission = Admission()
        self.idle_watch = IdleWatch()  # its task runs in the lifespan's supervisor
        # What the engines say about their load, written by the readers (load_reader.py).
        self.loads = LoadBook()
        self._strategy_name = ""
        self.reconfigure(config, pools)

    def reconfigure(self, config: Config, pools: dict[str, BackendPool]) -> None:
        """Adopt a (re)loaded config; requests in flight keep the pools they hold."""
        self.config = config
        self.pools = pools
        self._settings = config.gateway
        self.idle_watch.timeout(config.gateway.idle_timeout)
        self._limits = {b.name: b.max_concurrent for b in config.backends}
        self._affinity = config.balancer.strategy == "prefix-affinity"
        self._load_aware = config.balancer.strategy == "least-loaded"
        self.loads.configure(
            interval=config.health.load_interval, slow_start=config.balancer.slow_start
        )
        self.loads.reconcile((b.name for b in config.backends), trio.current_time())
        self.admission.aging = config.gateway.batch_aging
        if config.balancer.strategy != self._strategy_name:
            self._strategy_name = config.balancer.strategy
            self.strategy = make_strategy(config.balancer.strategy, random.Random())

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, record: RequestRecord
    ) -> None:
        """Run one request through every phase; returns when the client has its answer.

        `record.tenant`, when set, is who asks: a model its key may not use is refused (403)."""
        downstream = Downstream(send, record)
        try:
            body = await self.accept(scope, receive)
            record.bytes_in = len(body)
            record.phase = "first_byte"
            prepared = self.prepare(scope, body, record)
        except ClientGone:
            client_left(record, committed=False)
            return
        except GatewayError as error:
            await downstream.fail(error)
            return
        async with cancelled_on_disconnect(receive, downstream, self.idle_watch):
            try:
                await self.respond(scope, prepared, downstream)
            except GatewayError as error:
                if error.source != "upstream":  # upstream failures were logged per attempt
                    log.warning("request %s: %s", downstream.request_id.decode(), error.message)
                await downstream.fail(error)

    async def accept(self, scope: Scope, receive: Receive) -> bytes:
        """Phase accept: the whole request body, within `max_request_body` and `body_timeout`."""
        limit = self._settings.max_request_body
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_large(limit)
        if isinstance(receive, Inbox) and receive.holds_the_end():
            # A short body came with the head: reading it will not wait, so needs no timer.
            return await read_body(receive, limit)
        with trio.move_on_after(self._settings.body_timeout) as reading:
            return await read_body(receive, limit)
        assert reading.cancelled_caught
        raise client_error(408, "request_timeout", "The request body did not arrive in time")

    def prepare(self, scope: Scope, body: bytes, record: RequestRecord) -> Prepared:
        """Classify the request and take from its parsed body all that later phases need.

        The parsed body (`ProxiedRequest.payload`) is not kept: a request holds what it
        prepared for as long as its stream lasts, and the parsed form of a prompt takes several
        times its size. `record.tenant`, when set, is who asks: a model its key may not use is
        refused (403)."""
        request = classify(scope["method"].encode(), scope["raw_path"], scope["query_string"], body)
        record.model = request.model
        tenant = record.tenant
        if tenant is not None and not tenant.may_use(request.model):
            message = f"The key {tenant.name!r} may not use the model {request.model!r}"
            raise client_error(403, "model_not_allowed", message)
        payload = request.payload
        prepared = Prepared(attrs.evolve(request, payload=None), body)
        if payload is None:
            return prepared
        prepared.prompt = prompt_estimate(payload)
        if self.config.usage.request_stream_usage:
            # The client did not ask for usage in its stream: ask for it, and strip it again.
            asked = with_stream_usage(scope["raw_path"], payload)
            if asked:
                prepared.body, prepared.strip = asked, True
        if self._affinity:
            prepared.affinity = affinity_key(payload)
        cache = self.cache
        if cache is not None:
            plan = cacheability(
                scope["raw_path"],
                payload,
                deterministic_only=cache.settings.deterministic_only,
                cache_control=header(scope, b"cache-control"),
            )
            prepared.plan = plan
            if plan.lookup or plan.store:
                prepared.key = cache_key(
                    scope["method"].encode(),
                    request.target,
                    scope_for(_bearer_token(scope), cache.settings.scope),
                    payload,
                )
        return prepared

    async def respond(self, scope: Scope, prepared: Prepared, downstream: Downstream) -> None:
        """Phase cache lookup: a hit is replayed, an identical request in flight is joined, a
        cacheable miss becomes a shared flight; anything else goes straight upstream."""
        cache = self.cache
        forward = partial(self.forward, scope, prepared)
        if cache is None:
            await forward(downstream, downstream.record)
            return
        key = prepared.key
        if key is None:
            cache.bypass += 1
            downstream.record.cache = "bypass"
            await forward(downstream, downstream.record)
            return
        plan = prepared.plan
        assert plan is not None
        remote = None
        if plan.lookup:
            if (hit := cache.lookup(key)) is not None:
                downstream.record.cache = "hit"
                await replay(hit, downstream)
                if hit.usage is not None:
                    self.accounts.served(downstream.record, hit.usage)
                return
            if (flight := cache.joinable(key)) is not None:
                downstream.record.cache = "coalesced"
                await listen(flight, downstream)
                self._served_by(flight, downstream.record)
                return
            found = await cache.lookup_shared(key)
            if isinstance(found, CachedResponse):
                downstream.record.cache = "hit"
                await replay(found, downstream)
                if found.usage is not None:
                    self.accounts.served(downstream.record, found.usage)
                return
            remote = found
            # While L2 was asked, an identical request may have started a flight.
            if (flight := cache.joinable(key)) is not None:
                downstream.record.cache = "coalesced"
                await listen(flight, downstream)
                self._served_by(flight, downstream.record)
                return
        downstream.record.cache = "coalesced" if isinstance(remote, Follow) else "miss"
        # The flight outlives this client if others joined it: what it notes on this record
        # after the client left is never read.
        flight = cache.start_flight(
            key,
            downstream.request_id,
            coalesce=plan.lookup,
            store=plan.store,
            dialect=downstream.dialect,
            run=partial(forward, record=downstream.record),
            remote=remote,
        )
        await listen(flight, downstream)
        if flight.follower:  # another worker's backend request answered: served, not generated
            self._served_by(flight, downstream.record)

    def _served_by(self, flight: Flight, record: RequestRecord) -> None:
        """A request answered by a flight it did not run counts its tokens as cached."""
        if flight.usage is not None and not flight.failed:
            self.accounts.served(record, flight.usage)

    async def forward(
        self, scope: Scope, prepared: Prepared, downstream: ResponseSink, record: RequestRecord
    ) -> None:
        """Phases pick upstream and admission, then tries on backends until one answers.

        A failure before commit moves on to another backend (never the same one twice), at
        most `retries` times; after commit the stream is never replayed elsewhere. `record`
        is the client's (for a shared flight: its first client's).
        """
        exchange = Exchange(scope, prepared, downstream, record)
        tallies = self.tallies
        last_error: GatewayError | None = None
        failed = ""
        for attempt in range(self._settings.retries + 1):
            ticket = await self.admit(exchange, first=attempt == 0)
            if ticket is None:
                break
            if failed:
                tallies.retries[failed] += 1
            exchange.tried.add(ticket.name)
            record.retries = attempt
            record.backend = ticket.name
            last_error = await self.attempt(
                ticket, exchange, last=attempt == self._settings.retries
            )
            if last_error is None:
                if failed:
                    tallies.failovers[ticket.name] += 1
                return
            # Logged even when another backend then answers: a refused connection, a timeout
            # or a TLS certificate that does not verify must not pass unnoticed behind a retry.
            log.warning("request %s: %s", downstream.request_id.decode(), last_error.message)
            if last_error.source == "gateway":  # another backend would fail the same way
                break
            failed = ticket.name
        assert last_error is not None
        raise last_error

    async def admit(self, exchange: Placement, *, first: bool) -> Ticket | None:
        """Phases pick upstream and admission: the best eligible backend with a free slot.

        Waits up to `queue_timeout`, in fair order (ntonix.admission), when every eligible
        backend is at `max_concurrent`; None when failover has no untried backend left.
        """
        # Requests already waiting go first: a slot they can use is theirs.
        self.admission.admit_waiting()
        try_admit = partial(self._try_admit, exchange)
        tenant = exchange.record.tenant
        ticket = try_admit()
        if ticket is not None:
            self.admission.served(tenant)
            return ticket
        model = exchange.model
        now = trio.current_time()
        if not any(n not in exchange.tried for n in self.health.eligible(model, now)):
            if not first:
                return None
            raise self._no_route(model, now)
        deadline = now + self._settings.queue_timeout
        exchange.record.phase = "queue"
        # Same model, same backends tried: the same slots will do (affinity only orders them).
        group = (model, frozenset(exchange.tried))
        ticket = await self.admission.wait(try_admit, deadline, self._abandon, tenant, group)
        exchange.record.phase = "first_byte"
        self.tallies.queue_wait.observe(trio.current_time() - now)
        if ticket is None:
            raise GatewayError(
                503,
                "backends_busy",
                "Every backend that serves this model is at max_concurrent",
                source="gateway",
                retry_after=1,
            )
        return ticket

    def _try_admit(self, exchange: Placement) -> Ticket | None:
        """The strategy's first choice among untried eligible backends below their limit."""
        now = trio.current_time()
        names = [n for n in self.health.eligible(exchange.model, now) if n not in exchange.tried]
        candidates = self.health.candidates(names)
        if self._load_aware:
            candidates = self.loads.annotate(candidates, exchange.model, now)
        in_flight = {c.name: c.in_flight for c in candidates}
        for name in self.strategy.order(candidates, affinity_key=exchange.affinity):
            limit = self._limits.get(name, 0)
            if limit and in_flight[name] >= limit:
                continue
            ticket = self.health.begin(name, now)
            if ticket is not None:
                return ticket
        return None

    def _abandon(self, ticket: Ticket) -> None:
        """A queued request got its slot as its client left: give the slot back."""
        self.health.end(ticket, Outcome.CLIENT_DISCONNECTED, trio.current_time())
        self.admission.admit_waiting()

    async def attempt(
        self, ticket: Ticket, exchange: Exchange, *, last: bool
    ) -> GatewayError | None:
        """One try on one backend: connect, first byte, commit, stream body, finish.

        Returns the error to retry elsewhere when nothing reached the client, None when the
        client has its answer (a success, or an error already written into its stream).
        """
        settings = self._settings
        pool = self.pools[ticket.name]
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
                    self._upstream_headers(exchange, pool),
                    exchange.body,
                )
                self.loads.sent(ticket.name, ticket.id, trio.current_time())
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
            if answered in _RETRYABLE and not last and self._has_alternative(exchange):
                report.outcome = answered
                return upstream_error(
                    502, "backend_error", f"Backend {ticket.name} answered {status}"
                )
            if 200 <= status < 300 and exchange.prompt is not None:
                exchange.meter = UsageMeter(
                    stream_kind(response.headers), strip=exchange.strip, prompt=exchange.prompt
                )
            await exchange.downstream.start(
                status,
                client_response_headers(response.headers, backend=ticket.name.encode()),
            )
            try:
                first_data_at = await relay_body(
                    connection,
                    exchange.downstream,
                    settings.idle_timeout,
                    ticket.name,
                    self.idle_watch,
                    exchange.meter,
                    partial(self._charge, exchange),
                )
                if first_data_at is not None and exchange.request.stream:
                    report.first_data = first_data_at - sent_at
            except GatewayError as error:
                report.outcome = Outcome.FAILED_MIDSTREAM
                report.error = error.message
                log.warning(
                    "request %s: %s", exchange.downstream.request_id.decode(), error.message
                )
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
                self._charge(exchange)  # cut short: what passed, estimated
            self.loads.finished(ticket.name, ticket.id, trio.current_time())
            if report.outcome is Outcome.COMPLETED and report.first_data is not None:
                self.loads.observe_ttfb(ticket.name, exchange.request.model, report.first_data)
            self.release(ticket, report)

    def release(self, ticket: Ticket, report: Report) -> None:
        """An attempt (or a WebSocket session) on a backend ended: count it, report its outcome
        to the health table and offer its slot to the requests waiting for one."""
        tallies = self.tallies
        tallies.attempts[(ticket.name, report.outcome.value)] += 1
        if report.outcome is Outcome.CLIENT_DISCONNECTED:
            tallies.cancellations[ticket.name] += 1
        self.health.end(
            ticket,
            report.outcome,
            trio.current_time(),
            ttfb=report.ttfb,
            retry_after=report.retry_after,
            error=report.error,
        )
        self.admission.admit_waiting()

    def _charge(self, exchange: Exchange) -> None:
        """The response's tokens are known (or it ended early): count and charge them once."""
        assert exchange.meter is not None
        exchange.charged = True
        usage = exchange.meter.usage()
        if isinstance(exchange.downstream, Flight):
            exchange.downstream.usage = usage  # for those who join it and for the cache
        self.accounts.generated(exchange.record, usage)

    def _has_alternative(self, exchange: Exchange) -> bool:
        now = trio.current_time()
        return any(
            name not in exchange.tried for name in self.health.eligible(exchange.request.model, now)
        )

    def _upstream_headers(self, exchange: Exchange, pool: BackendPool) -> list[tuple[bytes, bytes]]:
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

    def _no_route(self, model: str | None, now: float) -> GatewayError:
        status = no_route_status(serving=self.health.serving(model), eligible=())
        if status == 404:
            return client_error(404, "model_not_found", f"No backend serves the model {model!r}")
        return GatewayError(
            503,
            "no_healthy_backend",
            "No healthy backend can take this request now",
            source="gateway",
            retry_after=self.health.retry_after(model, now),
        )


class Placement(Protocol):
    """What picking a backend needs to know of a request or a WebSocket session."""

    tried: set[str]  # backends already tried: never the same one twice
    affinity: str | None
    record: RequestRecord  # its phase shows "queue" while it waits for a slot

    @property
    def model(self) -> str | None: ...


class ResponseSink(Protocol):
    """Where an exchange writes its response: one client (`Downstream`) or a shared `Flight`."""

    request_id: bytes
    committed: bool

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    async def write(self, data: bytes, *, more: bool) -> None: ...
    async def fail(self, error: GatewayError) -> None: ...


class Exchange:
    """One client request on its way through the phases, whichever backend it ends up on."""

    __slots__ = (
        "affinity",
        "body",
        "charged",
        "downstream",
        "meter",
        "method",
        "prompt",
        "record",
        "request",
        "scope",
        "strip",
        "tried",
    )

    def __init__(
        self, scope: Scope, prepared: Prepared, downstream: ResponseSink, record: RequestRecord
    ) -> None:
        self.scope = scope
        self.request = prepared.request
        self.body = prepared.body
        self.downstream = downstream
        self.record = record
        self.method = scope["method"].encode()
        self.tried: set[str] = set()
        self.affinity = prepared.affinity
        self.strip = prepared.strip
        self.prompt = prepared.prompt
        self.meter: UsageMeter | None = None  # reads the committed response's tokens
        self.charged = False

    @property
    def model(self) -> str | None:
        return self.request.model


class Prepared:
    """A request as the phases after accept see it: no parsed body, what they need of it."""

    __slots__ = ("affinity", "body", "key", "plan", "prompt", "request", "strip")

    def __init__(self, request: ProxiedRequest, body: bytes) -> None:
        self.request = request  # without its payload
        self.body = body  # what goes upstream
        # Asks for stream usage the client did not: the usage-only event is taken out again.
        self.strip = False
        # The prompt's estimated tokens; None when the body was not parsed (not a generation).
        self.prompt: int | None = None
        self.affinity: str | None = None  # prefix-affinity's key
        self.plan: Decision | None = None  # what the cache may do (cache on, body parsed)
        self.key: str | None = None  # the cache key, when the plan looks up or stores


class Report:
    """What one attempt tells the health table when it ends, whatever way it ends."""

    __slots__ = ("error", "first_data", "outcome", "retry_after", "ttfb")

    def __init__(self) -> None:
        # Until something else is known, the client left (cancellation) and proved nothing.
        self.outcome = Outcome.CLIENT_DISCONNECTED
        self.ttfb: float | None = None
        # Of a stream: to its first body bytes, which engines send with the first token (the
        # head may come at once); what least-loaded's latency EWMA learns from.
        self.first_data: float | None = None
        self.retry_after: float | None = None
        self.error = ""


_RETRYABLE = frozenset({Outcome.UPSTREAM_5XX, Outcome.UPSTREAM_429})


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


def _bearer_token(scope: Scope) -> str | None:
    value = header(scope, b"authorization")
    return value[7:].decode("latin-1") if value[:7].lower() == b"bearer " else None


def _client_address(scope: Scope) -> bytes:
    client = scope.get("client")
    return client[0].encode() if client else b"unknown"
