"""The life of a proxied request: one driver runs the phases in order (docs/flow.md).

accept -> pick upstream -> admission -> connect -> first byte -> commit -> stream body -> finish.
Each phase is a small function; the driver owns their timeouts. Until commit, a failure becomes a
JSON error response; after it, the stream ends with an explicit error frame (or an abort), never
a clean end that looks like success.

This module keeps the driver (accept, prepare, cache lookup, failover); the phases it drives
live beside it: a backend slot taken and given back in ntonix.backend_slots, one try on one
backend in ntonix.upstream_attempt, and the records a request carries through them in
ntonix.exchange.

Invariants the driver owns:
- A request goes to at most `retries + 1` backends, never the same one twice, and only while
  nothing reached its client; a gateway-side failure is not retried (another backend would fail
  the same way).
- Every attempt's failure is logged, even when another backend then answers.
"""

from __future__ import annotations

import logging
import random
from functools import partial

import trio

from ntonix import upstream_attempt
from ntonix.accounts import Accounts
from ntonix.admission import Admission
from ntonix.asgi import Receive, Scope, Send, header
from ntonix.backend_slots import admit
from ntonix.cache import Flight, ResponseCache, listen, replay
from ntonix.config import Config
from ntonix.core.balancer import affinity_key, make_strategy
from ntonix.core.health import HealthTable
from ntonix.core.keys import cache_key, cacheability, scope_for
from ntonix.core.lru import CachedResponse
from ntonix.core.requests import ProxiedRequest, classify
from ntonix.core.signals import LoadBook
from ntonix.core.telemetry import RequestRecord, Tallies
from ntonix.core.usage import with_stream_usage
from ntonix.downstream import (
    ClientGone,
    Downstream,
    cancelled_on_disconnect,
    client_left,
    read_body,
    too_large,
)
from ntonix.errors import GatewayError, client_error
from ntonix.exchange import Exchange, Prepared, ResponseSink
from ntonix.inbox import Inbox
from ntonix.shared_flights import Follow
from ntonix.upstream import BackendPool
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
        # settings, limits and load_aware are read by the phases beside this module too
        # (backend_slots, upstream_attempt).
        self.settings = config.gateway
        self.idle_watch.timeout(config.gateway.idle_timeout)
        self.limits = {b.name: b.max_concurrent for b in config.backends}
        self._affinity = config.balancer.strategy == "prefix-affinity"
        self.load_aware = config.balancer.strategy == "least-loaded"
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
        if isinstance(receive, Inbox):
            downstream.join_head = receive.join_next_write
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
        limit = self.settings.max_request_body
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_large(limit)
        if isinstance(receive, Inbox) and receive.holds_the_end():
            # A short body came with the head: reading it will not wait, so needs no timer.
            return await read_body(receive, limit)
        with trio.move_on_after(self.settings.body_timeout) as reading:
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
        if payload is None:
            return Prepared(request, body)
        # Built directly: `attrs.evolve` reads the class's fields on every call.
        prepared = Prepared(ProxiedRequest(request.target, request.model, request.stream), body)
        prepared.metered = True
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
        for attempt in range(self.settings.retries + 1):
            ticket = await admit(self, exchange, first=attempt == 0)
            if ticket is None:
                break
            if failed:
                tallies.retries[failed] += 1
            exchange.tried.add(ticket.name)
            record.retries = attempt
            record.backend = ticket.name
            last_error = await upstream_attempt.attempt(
                self, ticket, exchange, last=attempt == self.settings.retries
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


def _bearer_token(scope: Scope) -> str | None:
    value = header(scope, b"authorization")
    return value[7:].decode("latin-1") if value[:7].lower() == b"bearer " else None
