"""What one proxied request carries through the phases, and what its phases write to.

`Prepared` is a request as the phases after accept see it; `Exchange` is that request on its way
to whichever backend answers it; `Report` is what one attempt on one backend tells the health
table when it ends. `Placement` and `ResponseSink` are what picking a backend and writing a
response need of them, so that WebSocket sessions and shared flights use the same phases.

Invariants these records hold:
- No parsed body: a request keeps what it prepared for as long as its stream lasts, and the
  parsed form of a prompt takes several times its size (`Prepared.request` has no payload).
- `Exchange.tried` only grows: a request never goes to the same backend twice.
- A `Report` starts as a client disconnect: an attempt cut short by cancellation proves
  nothing about its backend.
"""

from __future__ import annotations

from typing import Protocol

from ntonix.asgi import Scope
from ntonix.core.health import Outcome
from ntonix.core.keys import Decision
from ntonix.core.requests import ProxiedRequest
from ntonix.core.telemetry import RequestRecord
from ntonix.core.usage import UsageMeter
from ntonix.errors import GatewayError


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

    async def start(
        self, status: int, headers: list[tuple[bytes, bytes]], *, body_follows: bool = False
    ) -> None: ...
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
        "metered",
        "method",
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
        self.metered = prepared.metered
        self.meter: UsageMeter | None = None  # reads the committed response's tokens
        self.charged = False

    @property
    def model(self) -> str | None:
        return self.request.model


class Prepared:
    """A request as the phases after accept see it: no parsed body, what they need of it."""

    __slots__ = ("affinity", "body", "key", "metered", "plan", "request", "strip")

    def __init__(self, request: ProxiedRequest, body: bytes) -> None:
        self.request = request  # without its payload
        self.body = body  # what goes upstream
        # Asks for stream usage the client did not: the usage-only event is taken out again.
        self.strip = False
        # A generation (its body parsed): its response's tokens are counted, and its prompt
        # estimated from `body` should the backend report no counts.
        self.metered = False
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
