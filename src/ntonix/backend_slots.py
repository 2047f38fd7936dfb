"""A backend slot: taken at admission, given back (with its outcome and tokens) at release.

Phases pick upstream and admission choose the best eligible backend below its
`max_concurrent`, or wait for one in fair order (ntonix.admission); an attempt (or a WebSocket
session) that ends releases its slot.

Invariants this module owns:
- A slot taken is given back exactly once, whatever way its attempt ends (`release`, or
  `abandon` for a queued request whose client left as it got one), and every give-back offers
  the slot to the requests waiting for one.
- Requests already waiting go first: a slot they can use is theirs.
- A failover never picks a backend the request already tried.
- A response's tokens are charged once (`charge`), when they are known or when it ends early.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import trio

from ntonix.cache import Flight
from ntonix.core.health import Outcome, Ticket, no_route_status
from ntonix.errors import GatewayError, client_error
from ntonix.exchange import Exchange, Placement, Report

if TYPE_CHECKING:
    from ntonix.proxy import Proxy


async def admit(proxy: Proxy, exchange: Placement, *, first: bool) -> Ticket | None:
    """Phases pick upstream and admission: the best eligible backend with a free slot.

    Waits up to `queue_timeout`, in fair order (ntonix.admission), when every eligible
    backend is at `max_concurrent`; None when failover has no untried backend left.
    """
    # Requests already waiting go first: a slot they can use is theirs.
    proxy.admission.admit_waiting()
    try_admit = partial(_try_admit, proxy, exchange)
    tenant = exchange.record.tenant
    ticket = try_admit()
    if ticket is not None:
        proxy.admission.served(tenant)
        return ticket
    model = exchange.model
    now = trio.current_time()
    if not any(n not in exchange.tried for n in proxy.health.eligible(model, now)):
        if not first:
            return None
        raise _no_route(proxy, model, now)
    deadline = now + proxy.settings.queue_timeout
    exchange.record.phase = "queue"
    # Same model, same backends tried: the same slots will do (affinity only orders them).
    group = (model, frozenset(exchange.tried))
    ticket = await proxy.admission.wait(
        try_admit, deadline, partial(_abandon, proxy), tenant, group
    )
    exchange.record.phase = "first_byte"
    proxy.tallies.queue_wait.observe(trio.current_time() - now)
    if ticket is None:
        raise GatewayError(
            503,
            "backends_busy",
            "Every backend that serves this model is at max_concurrent",
            source="gateway",
            retry_after=1,
        )
    return ticket


def _try_admit(proxy: Proxy, exchange: Placement) -> Ticket | None:
    """The strategy's first choice among untried eligible backends below their limit."""
    now = trio.current_time()
    names = [n for n in proxy.health.eligible(exchange.model, now) if n not in exchange.tried]
    candidates = proxy.health.candidates(names)
    if proxy.load_aware:
        candidates = proxy.loads.annotate(candidates, exchange.model, now)
    in_flight = {c.name: c.in_flight for c in candidates}
    for name in proxy.strategy.order(candidates, affinity_key=exchange.affinity):
        limit = proxy.limits.get(name, 0)
        if limit and in_flight[name] >= limit:
            continue
        ticket = proxy.health.begin(name, now)
        if ticket is not None:
            return ticket
    return None


def _abandon(proxy: Proxy, ticket: Ticket) -> None:
    """A queued request got its slot as its client left: give the slot back."""
    proxy.health.end(ticket, Outcome.CLIENT_DISCONNECTED, trio.current_time())
    proxy.admission.admit_waiting()


def release(proxy: Proxy, ticket: Ticket, report: Report) -> None:
    """An attempt (or a WebSocket session) on a backend ended: count it, report its outcome
    to the health table and offer its slot to the requests waiting for one."""
    tallies = proxy.tallies
    tallies.attempts[(ticket.name, report.outcome.value)] += 1
    if report.outcome is Outcome.CLIENT_DISCONNECTED:
        tallies.cancellations[ticket.name] += 1
    proxy.health.end(
        ticket,
        report.outcome,
        trio.current_time(),
        ttfb=report.ttfb,
        retry_after=report.retry_after,
        error=report.error,
    )
    proxy.admission.admit_waiting()


def charge(proxy: Proxy, exchange: Exchange) -> None:
    """The response's tokens are known (or it ended early): count and charge them once."""
    assert exchange.meter is not None
    exchange.charged = True
    usage = exchange.meter.usage()
    if isinstance(exchange.downstream, Flight):
        exchange.downstream.usage = usage  # for those who join it and for the cache
    proxy.accounts.generated(exchange.record, usage)


def _no_route(proxy: Proxy, model: str | None, now: float) -> GatewayError:
    status = no_route_status(serving=proxy.health.serving(model), eligible=())
    if status == 404:
        return client_error(404, "model_not_found", f"No backend serves the model {model!r}")
    return GatewayError(
        503,
        "no_healthy_backend",
        "No healthy backend can take this request now",
        source="gateway",
        retry_after=proxy.health.retry_after(model, now),
    )
