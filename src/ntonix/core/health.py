"""The health table: one record per backend, fed by live traffic and active probes.

Invariants: the proxy reports outcomes and the table decides what they mean (Envoy's outlier
detection): only connect failures, timeouts, 5xx and streams broken mid-way count as failures;
a 4xx (429 included) proves the backend alive, a client disconnect proves nothing. Eligibility
is derived every time from independent reasons (circuit open or trial in flight, back-off after
a 429, failing probes, draining after a reload), never stored as one flag. In-flight counts are
exactly the tickets begun and not yet ended; a half-open backend gets its one trial through
`begin`, which claims it; a backend removed by a reload drains until its last request ends.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from typing import Protocol

import attrs

from ntonix.core.balancer import Candidate
from ntonix.core.breaker import BreakerSettings, CircuitBreaker, Event, State, Transition

LATENCY_ALPHA = 0.2  # weight of the newest sample in the latency EWMA: ~10 requests of memory
DEFAULT_RETRY_AFTER = 1.0  # seconds to skip a backend whose 429 named no Retry-After


class Outcome(enum.Enum):
    """How one request (or probe) to a backend ended, as the proxy saw it."""

    COMPLETED = "completed"
    CONNECT_FAILED = "connect_failed"
    TIMED_OUT = "timed_out"
    UPSTREAM_5XX = "upstream_5xx"
    UPSTREAM_4XX = "upstream_4xx"
    UPSTREAM_429 = "upstream_429"
    FAILED_MIDSTREAM = "failed_midstream"
    CLIENT_DISCONNECTED = "client_disconnected"
    # The gateway could not even try: out of file descriptors or memory.
    GATEWAY_FAILED = "gateway_failed"


class Verdict(enum.Enum):
    """What an outcome says about the backend."""

    ALIVE = "alive"
    FAILED = "failed"
    NEUTRAL = "neutral"


_VERDICTS = {
    Outcome.COMPLETED: Verdict.ALIVE,
    # The backend parsed the request and answered: a context-length 400 must never eject it.
    Outcome.UPSTREAM_4XX: Verdict.ALIVE,
    # Back-off, handled by the skip window, but still an answer from a live backend.
    Outcome.UPSTREAM_429: Verdict.ALIVE,
    Outcome.CONNECT_FAILED: Verdict.FAILED,
    Outcome.TIMED_OUT: Verdict.FAILED,
    Outcome.UPSTREAM_5XX: Verdict.FAILED,
    Outcome.FAILED_MIDSTREAM: Verdict.FAILED,
    # The client left; whatever the backend was doing, it was not proven right or wrong.
    Outcome.CLIENT_DISCONNECTED: Verdict.NEUTRAL,
    # Says nothing about the backend: a gateway out of descriptors must not eject them all.
    Outcome.GATEWAY_FAILED: Verdict.NEUTRAL,
}


def verdict_of(outcome: Outcome) -> Verdict:
    return _VERDICTS[outcome]


def no_route_status(*, serving: Collection[str], eligible: Collection[str]) -> int | None:
    """The error status when no backend can take a request: None if one can.

    404 when no configured backend serves the model at all, 503 when those that serve it are
    all unavailable right now (pair it with `HealthTable.retry_after`).
    """
    if eligible:
        return None
    return 503 if serving else 404


class BackendLike(Protocol):
    """What the table needs from a configured backend (config.BackendSettings fits)."""

    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def models(self) -> Collection[str]: ...


@attrs.frozen
class Ticket:
    """One request or probe in flight on a backend; hand it back to `HealthTable.end`."""

    id: int
    name: str
    record: int  # which incarnation of the backend: a name removed and added again is a new one
    trial: bool  # this is the half-open trial: its outcome closes or re-opens the circuit
    probe: bool  # an active health check: not counted in flight, teaches the model list


@attrs.frozen
class BackendSnapshot:
    """One backend as /ntonix/status shows it."""

    name: str
    weight: int
    state: str  # "closed" | "open" | "half-open"
    consecutive_failures: int
    in_flight: int
    latency_ms: float | None  # EWMA of time to first byte of completed requests
    last_error: str
    models: tuple[str, ...] | None  # configured, else learned from probes; None: unknown (any)
    retry_after_until: float | None  # skipped after a 429 until this time
    probe: str  # "unknown" | "ok" | "failing"
    draining: bool
    reasons: tuple[str, ...]  # why it takes no traffic now; empty when eligible


@attrs.frozen
class CircuitChange:
    """A backend's circuit moved (closed -> open -> half-open -> closed), and why: a log line."""

    backend: str
    before: State
    after: State
    reason: str

    def __str__(self) -> str:
        return f"backend {self.backend}: circuit {self.before.value} -> {self.after.value}: " + (
            self.reason
        )


@attrs.define
class _Record:
    id: int
    name: str
    weight: int
    configured_models: frozenset[str]
    breaker: CircuitBreaker
    tickets: dict[int, Ticket] = attrs.field(factory=dict)
    # The tickets that are requests, not probes: counted as they begin and end, since the
    # balancer reads it for every request (summing the tickets made a burst quadratic).
    requests: int = 0
    latency: float | None = None
    last_error: str = ""
    learned_models: frozenset[str] | None = None
    probe_failures: int = 0
    probe_ok: bool | None = None
    probe_error: str = ""
    backoff_until: float | None = None
    draining: bool = False
    answered: bool = False  # a probe or a request has had a live answer from it since start
    announced: State = State.CLOSED  # the circuit state last told to `on_change`

    @property
    def in_flight(self) -> int:
        return self.requests

    @property
    def models(self) -> frozenset[str] | None:
        return self.configured_models or self.learned_models

    def serves(self, model: str | None) -> bool:
        models = self.models
        if model is None or not models:
            return True
        # Ollama answers "llama3" with "llama3:latest", and lists the latter.
        return model in models or (":" not in model and f"{model}:latest" in models)


class HealthTable:
    """Every backend's breaker, load, latency, models and back-off, keyed by name."""

    def __init__(
        self,
        backends: Iterable[BackendLike],
        breaker: BreakerSettings | None = None,
        *,
        latency_alpha: float = LATENCY_ALPHA,
        on_change: Callable[[CircuitChange], None] | None = None,
    ) -> None:
        """`on_change` hears of every circuit change of every backend, once, as it happens."""
        self._settings = breaker or BreakerSettings()
        self._alpha = latency_alpha
        self._on_change = on_change
        self._ids = itertools.count(1)
        self._records: dict[str, _Record] = {}
        # (backend, from state, to state) -> how often an outcome moved its breaker so.
        self.transitions: Counter[tuple[str, str, str]] = Counter()
        self.reconcile(backends)

    @property
    def names(self) -> list[str]:
        """Every backend with a record, draining ones included, in config order."""
        return list(self._records)

    def reconcile(
        self, backends: Iterable[BackendLike], breaker: BreakerSettings | None = None
    ) -> None:
        """Adopt a reloaded backend list: kept names keep their health, new ones start closed.

        A removed backend drains: it takes no new requests, and its record goes when its last
        in-flight request ends. Weights and configured models follow the new list; new breaker
        settings apply to the backends added from now on.
        """
        if breaker is not None:
            self._settings = breaker
        old = self._records
        records: dict[str, _Record] = {}
        for backend in backends:
            record = old.get(backend.name)
            if record is None:
                record = _Record(
                    next(self._ids),
                    backend.name,
                    backend.weight,
                    frozenset(backend.models),
                    CircuitBreaker(self._settings),
                )
            record.weight = backend.weight
            record.configured_models = frozenset(backend.models)
            record.draining = False
            records[backend.name] = record
        for name, record in old.items():
            if name not in records and record.in_flight:
                record.draining = True
                records[name] = record
        self._records = records

    def eligible(self, model: str | None, now: float) -> list[str]:
        """Backends that may take a request for `model` now, in config order.

        A half-open one is included while its trial is free: `begin` claims it.
        """
        return [
            record.name
            for record in self._records.values()
            if record.serves(model) and not self._reasons(record, now)
        ]

    def serving(self, model: str | None) -> list[str]:
        """Configured backends that serve `model`, whatever their health."""
        return [
            record.name
            for record in self._records.values()
            if not record.draining and record.serves(model)
        ]

    def why_not(self, name: str, now: float) -> list[str]:
        """Why `name` takes no traffic now, one line per reason; empty when it does."""
        record = self._records.get(name)
        return ["not configured"] if record is None else self._reasons(record, now)

    def candidates(self, names: Iterable[str]) -> list[Candidate]:
        """Balancer input for these backends: weight and in-flight count."""
        return [
            Candidate(name, record.weight, record.in_flight)
            for name in names
            if (record := self._records.get(name)) is not None
        ]

    def begin(self, name: str, now: float) -> Ticket | None:
        """Start a request on `name` right before connecting; None if it takes no traffic now.

        Claims the half-open trial when one is due, so no other request gets through until
        this one ends.
        """
        record = self._records.get(name)
        if record is None or self._reasons(record, now):
            return None
        return self._issue(record, now, probe=False)

    def begin_probe(self, name: str, now: float) -> Ticket | None:
        """Start an active health check; it is the trial if one is due. None for unknown names."""
        record = self._records.get(name)
        return None if record is None else self._issue(record, now, probe=True)

    def end(
        self,
        ticket: Ticket,
        outcome: Outcome,
        now: float,
        *,
        ttfb: float | None = None,
        retry_after: float | None = None,
        error: str = "",
        models: Collection[str] | None = None,
    ) -> Transition | None:
        """Report how a request or probe ended; the breaker transition it caused, if any.

        `ttfb` (seconds) feeds the latency EWMA of completed requests; `retry_after` is a 429's
        header (seconds; default 1 s, capped at max_open_for); `models` is what a probe learned
        (an empty list counts as unknown). Ending a ticket twice raises ValueError; a ticket
        of a backend that a reload removed is ignored.
        """
        record = self._records.get(ticket.name)
        if record is None or record.id != ticket.record:
            return None
        if record.tickets.pop(ticket.id, None) is None:
            raise ValueError(f"ticket {ticket.id} on {ticket.name} was already ended")
        if not ticket.probe:
            record.requests -= 1
        verdict = verdict_of(outcome)
        event = _EVENTS.get((ticket.trial, verdict))  # an ordinary neutral outcome has none
        transition = None if event is None else record.breaker.apply(event, now)
        if transition is not None:
            self.transitions[(record.name, transition.before.value, transition.after.value)] += 1
            self._announce(record, transition, error or outcome.value, ticket, now)
        if verdict is Verdict.FAILED:
            record.last_error = error or outcome.value
        elif verdict is Verdict.ALIVE:
            record.answered = True
        if outcome is Outcome.UPSTREAM_429:
            record.backoff_until = max(
                record.backoff_until or now, now + self._backoff(retry_after)
            )
        if ticket.probe:
            if verdict is Verdict.FAILED:
                record.probe_failures += 1
                record.probe_ok = False
                record.probe_error = error or outcome.value
            elif verdict is Verdict.ALIVE:
                record.probe_failures = 0
                record.probe_ok = True
            if models is not None:
                record.learned_models = frozenset(models) or None
        elif outcome is Outcome.COMPLETED and ttfb is not None:
            previous = record.latency
            record.latency = (
                ttfb if previous is None else previous + self._alpha * (ttfb - previous)
            )
        if record.draining and not record.in_flight:
            del self._records[record.name]
        return transition

    def retry_after(self, model: str | None, now: float) -> int:
        """Whole seconds until a backend serving `model` may take traffic again (at least 1)."""
        waits = []
        for record in self._records.values():
            if record.draining or not record.serves(model):
                continue
            stats = record.breaker.statistics(now)
            ready_at = now
            if stats.state is State.OPEN and stats.opened_until is not None:
                ready_at = stats.opened_until
            if record.backoff_until is not None:
                ready_at = max(ready_at, record.backoff_until)
            if ready_at > now:
                waits.append(ready_at - now)
        return max(1, math.ceil(min(waits, default=DEFAULT_RETRY_AFTER)))

    def ready(self, now: float) -> bool:
        """Some backend has answered (a probe or a request) since start and is well now: its
        circuit is not open, its probes pass, it is not draining.

        Until a first answer, nothing says a backend is there at all. A 429 back-off or a
        half-open trial in flight keeps the backend's place: they are moments, not ill health.
        """
        return any(
            record.answered
            and not record.draining
            and record.breaker.statistics(now).state is not State.OPEN
            and record.probe_failures < self._settings.failure_threshold
            for record in self._records.values()
        )

    def served_models(self, now: float) -> list[str]:
        """The union of known models over eligible backends, for /v1/models and /api/tags."""
        models: set[str] = set()
        for record in self._records.values():
            if record.models and not self._reasons(record, now):
                models |= record.models
        return sorted(models)

    def snapshot(self, now: float) -> tuple[BackendSnapshot, ...]:
        return tuple(self._snapshot(record, now) for record in self._records.values())

    def _snapshot(self, record: _Record, now: float) -> BackendSnapshot:
        stats = record.breaker.statistics(now)
        backing_off = record.backoff_until is not None and now < record.backoff_until
        return BackendSnapshot(
            name=record.name,
            weight=record.weight,
            state=stats.state.value,
            consecutive_failures=stats.consecutive_failures,
            in_flight=record.in_flight,
            latency_ms=None if record.latency is None else record.latency * 1000,
            last_error=record.last_error,
            models=None if record.models is None else tuple(sorted(record.models)),
            retry_after_until=record.backoff_until if backing_off else None,
            probe={None: "unknown", True: "ok", False: "failing"}[record.probe_ok],
            draining=record.draining,
            reasons=tuple(self._reasons(record, now)),
        )

    def _issue(self, record: _Record, now: float, *, probe: bool) -> Ticket:
        trial = record.breaker.needs_trial(now)
        if trial:
            record.breaker.begin_trial(now)
            # Time alone made the circuit half-open; this is the moment that shows it.
            if record.announced is State.OPEN:
                open_for = record.breaker.statistics(now).open_for
                kind = "a health probe" if probe else "a request"
                self._tell(record, State.HALF_OPEN, f"open for {open_for:g} s; {kind} is the trial")
        ticket = Ticket(next(self._ids), record.name, record.id, trial=trial, probe=probe)
        record.tickets[ticket.id] = ticket
        if not probe:
            record.requests += 1
        return ticket

    def _announce(
        self, record: _Record, transition: Transition, error: str, ticket: Ticket, now: float
    ) -> None:
        stats = record.breaker.statistics(now)
        if transition.event is Event.FAILURE:
            reason = (
                f"{stats.consecutive_failures} failures in a row, the last: {error}; "
                f"open for {stats.open_for:g} s"
            )
        elif transition.event is Event.TRIAL_FAILED:
            reason = f"the trial failed: {error}; open for {stats.open_for:g} s"
        else:
            reason = f"the trial ({'a health probe' if ticket.probe else 'a request'}) succeeded"
        self._tell(record, transition.after, reason)

    def _tell(self, record: _Record, state: State, reason: str) -> None:
        before, record.announced = record.announced, state
        if self._on_change is not None and state is not before:
            self._on_change(CircuitChange(record.name, before, state, reason))

    def _backoff(self, retry_after: float | None) -> float:
        if retry_after is None or not retry_after > 0:  # also catches NaN
            return DEFAULT_RETRY_AFTER
        return min(retry_after, self._settings.max_open_for)

    def _reasons(self, record: _Record, now: float) -> list[str]:
        if (
            record.breaker.closed
            and not record.draining
            and (record.backoff_until is None or now >= record.backoff_until)
            and record.probe_failures < self._settings.failure_threshold
        ):
            return []  # the common case, asked by every request: no snapshot to build
        reasons = []
        if record.draining:
            reasons.append(f"draining: removed from the config, {record.in_flight} in flight")
        stats = record.breaker.statistics(now)
        if stats.state is State.OPEN and stats.opened_until is not None:
            reasons.append(
                f"circuit open for {stats.opened_until - now:.1f} s more after "
                f"{stats.consecutive_failures} failures (last: {record.last_error or 'none'})"
            )
        elif stats.trial_in_flight:
            reasons.append("half-open: the trial request is in flight")
        if record.backoff_until is not None and now < record.backoff_until:
            reasons.append(f"backing off after a 429 for {record.backoff_until - now:.1f} s more")
        if record.probe_failures >= self._settings.failure_threshold:
            reasons.append(
                f"health probe failed {record.probe_failures} times in a row "
                f"(last: {record.probe_error})"
            )
        return reasons


_EVENTS = {
    (False, Verdict.ALIVE): Event.SUCCESS,
    (False, Verdict.FAILED): Event.FAILURE,
    (True, Verdict.ALIVE): Event.TRIAL_SUCCEEDED,
    (True, Verdict.FAILED): Event.TRIAL_FAILED,
    (True, Verdict.NEUTRAL): Event.TRIAL_ABANDONED,
}


def outcome_of_status(status: int) -> Outcome:
    """What a backend's response status says, before its body."""
    if status == 429:
        return Outcome.UPSTREAM_429
    if status >= 500:
        return Outcome.UPSTREAM_5XX
    if status >= 400:
        return Outcome.UPSTREAM_4XX
    return Outcome.COMPLETED


def retry_after_of(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """A `Retry-After` in seconds (the HTTP-date form counts as absent)."""
    for name, value in headers:
        if name == b"retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None
