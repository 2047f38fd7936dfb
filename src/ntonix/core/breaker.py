"""The circuit breaker of one backend: a small transition table driven by events and the clock.

Invariants: `failure_threshold` consecutive failures open the circuit; once the open period has
passed, exactly one trial (a request or a probe) is let through at a time, and only its outcome
closes or re-opens the circuit — outcomes of requests that started before the circuit opened
change nothing. Each re-open doubles the open period up to `max_open_for`; closing resets it.
An event the table does not allow in the current state raises BreakerError and changes nothing.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Event(enum.Enum):
    SUCCESS = "success"  # an ordinary request or probe proved the backend alive
    FAILURE = "failure"  # an ordinary request or probe failed
    TRIAL_STARTED = "trial_started"  # the caller sends the one trial allowed when half-open
    TRIAL_SUCCEEDED = "trial_succeeded"
    TRIAL_FAILED = "trial_failed"
    TRIAL_ABANDONED = "trial_abandoned"  # ended with no verdict (client left): another may try


class BreakerError(Exception):
    """An event that the breaker's current state does not allow; nothing was changed."""


@attrs.frozen
class BreakerSettings:
    """The [health] keys that drive a breaker. Seconds."""

    failure_threshold: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    open_for: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    max_open_for: float = attrs.field(default=300.0)

    @max_open_for.validator
    def _check_max(self, attribute: attrs.Attribute[float], value: float) -> None:
        if value < self.open_for:
            raise ValueError("max_open_for must be >= open_for")


@attrs.frozen
class Transition:
    """A change of state that an event caused, for logs and metrics."""

    event: Event
    before: State
    after: State
    at: float


@attrs.frozen
class BreakerStatistics:
    state: State
    consecutive_failures: int
    opened_until: float | None  # end of the current (or last) open period; None while closed
    open_for: float  # length of the current open period, or of the next one while closed
    trial_in_flight: bool
    transitions: int  # state changes caused by events (open -> half-open is just time passing)


class _Phase(enum.Enum):
    CLOSED = enum.auto()
    OPEN = enum.auto()  # within the open period
    HALF_OPEN = enum.auto()  # open period over, waiting for a trial
    TRIAL = enum.auto()  # half-open with the trial in flight


class _Action(enum.Enum):
    IGNORE = enum.auto()  # a stale outcome from before the circuit opened
    RESET = enum.auto()
    COUNT_FAILURE = enum.auto()
    START_TRIAL = enum.auto()
    CLOSE = enum.auto()
    REOPEN = enum.auto()
    END_TRIAL = enum.auto()


# The whole breaker. A (phase, event) pair missing here is illegal.
_TABLE: Final[dict[_Phase, dict[Event, _Action]]] = {
    _Phase.CLOSED: {
        Event.SUCCESS: _Action.RESET,
        Event.FAILURE: _Action.COUNT_FAILURE,
    },
    _Phase.OPEN: {
        Event.SUCCESS: _Action.IGNORE,
        Event.FAILURE: _Action.IGNORE,
    },
    _Phase.HALF_OPEN: {
        Event.SUCCESS: _Action.IGNORE,
        Event.FAILURE: _Action.IGNORE,
        Event.TRIAL_STARTED: _Action.START_TRIAL,
    },
    _Phase.TRIAL: {
        Event.SUCCESS: _Action.IGNORE,
        Event.FAILURE: _Action.IGNORE,
        Event.TRIAL_SUCCEEDED: _Action.CLOSE,
        Event.TRIAL_FAILED: _Action.REOPEN,
        Event.TRIAL_ABANDONED: _Action.END_TRIAL,
    },
}


class CircuitBreaker:
    """Closed -> open after `failure_threshold` failures -> half-open after the open period."""

    def __init__(self, settings: BreakerSettings | None = None) -> None:
        self.settings = settings or BreakerSettings()
        self._closed = True
        self._failures = 0
        self._open_for = self.settings.open_for
        self._opened_until: float | None = None
        self._trial = False
        self._transitions = 0

    def state(self, now: float) -> State:
        return _STATE_OF[self._phase(now)]

    @property
    def closed(self) -> bool:
        """Closed, whatever the time: the cheap question every request asks first."""
        return self._closed

    def may_try(self, now: float) -> bool:
        """Whether a request may go now: closed, or half-open with no trial in flight.

        When `needs_trial(now)` the request must be announced with `begin_trial(now)`.
        """
        return self._phase(now) in (_Phase.CLOSED, _Phase.HALF_OPEN)

    def needs_trial(self, now: float) -> bool:
        return self._phase(now) is _Phase.HALF_OPEN

    def begin_trial(self, now: float) -> None:
        """Claim the one trial of the half-open state; raises BreakerError if not available."""
        self.apply(Event.TRIAL_STARTED, now)

    def apply(self, event: Event, now: float) -> Transition | None:
        """Feed one event; the transition it caused, or None if the state stayed the same."""
        phase = self._phase(now)
        action = _TABLE[phase].get(event)
        if action is None:
            raise BreakerError(f"{event.value} is not allowed while {_describe(phase)}")
        before = _STATE_OF[phase]
        self._perform(action, now)
        after = self.state(now)
        if after is before:
            return None
        self._transitions += 1
        return Transition(event, before, after, now)

    def statistics(self, now: float) -> BreakerStatistics:
        return BreakerStatistics(
            state=self.state(now),
            consecutive_failures=self._failures,
            opened_until=None if self._closed else self._opened_until,
            open_for=self._open_for,
            trial_in_flight=self._trial,
            transitions=self._transitions,
        )

    def _phase(self, now: float) -> _Phase:
        if self._closed:
            return _Phase.CLOSED
        if self._trial:
            return _Phase.TRIAL
        assert self._opened_until is not None
        return _Phase.OPEN if now < self._opened_until else _Phase.HALF_OPEN

    def _perform(self, action: _Action, now: float) -> None:
        match action:
            case _Action.IGNORE:
                pass
            case _Action.RESET:
                self._failures = 0
            case _Action.COUNT_FAILURE:
                self._failures += 1
                if self._failures >= self.settings.failure_threshold:
                    self._open(now)
            case _Action.START_TRIAL:
                self._trial = True
            case _Action.CLOSE:
                self._closed = True
                self._trial = False
                self._failures = 0
                self._open_for = self.settings.open_for
                self._opened_until = None
            case _Action.REOPEN:
                self._trial = False
                self._failures += 1
                self._open_for = min(self._open_for * 2, self.settings.max_open_for)
                self._open(now)
            case _Action.END_TRIAL:
                self._trial = False

    def _open(self, now: float) -> None:
        self._closed = False
        self._opened_until = now + self._open_for


_STATE_OF: Final = {
    _Phase.CLOSED: State.CLOSED,
    _Phase.OPEN: State.OPEN,
    _Phase.HALF_OPEN: State.HALF_OPEN,
    _Phase.TRIAL: State.HALF_OPEN,
}


def _describe(phase: _Phase) -> str:
    if phase is _Phase.TRIAL:
        return "half-open with a trial in flight"
    if phase is _Phase.HALF_OPEN:
        return "half-open awaiting a trial"
    return _STATE_OF[phase].value
