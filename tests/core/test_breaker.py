from collections.abc import Callable

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.breaker import (
    BreakerError,
    BreakerSettings,
    CircuitBreaker,
    Event,
    State,
    Transition,
)

SETTINGS = BreakerSettings(failure_threshold=3, open_for=10.0, max_open_for=60.0)


def _opened(now: float = 0.0) -> CircuitBreaker:
    breaker = CircuitBreaker(SETTINGS)
    for _ in range(3):
        breaker.apply(Event.FAILURE, now)
    return breaker


def _trying(now: float = 10.0) -> CircuitBreaker:
    breaker = _opened()
    breaker.begin_trial(now)
    return breaker


def _half_open() -> CircuitBreaker:
    return _opened(-20)  # open period over at 5


SETUPS: dict[str, Callable[[], CircuitBreaker]] = {
    "closed": lambda: CircuitBreaker(SETTINGS),
    "open": _opened,
    "half-open": _half_open,
    "trial": _trying,
}


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        BreakerSettings(failure_threshold=0)
    with pytest.raises(ValueError):
        BreakerSettings(open_for=0)
    with pytest.raises(ValueError):
        BreakerSettings(open_for=10, max_open_for=5)


def test_threshold_consecutive_failures_open_the_circuit() -> None:
    breaker = CircuitBreaker(SETTINGS)
    assert breaker.apply(Event.FAILURE, 0) is None
    assert breaker.apply(Event.FAILURE, 1) is None
    assert breaker.state(1) is State.CLOSED
    assert breaker.apply(Event.FAILURE, 2) == Transition(Event.FAILURE, State.CLOSED, State.OPEN, 2)
    stats = breaker.statistics(2)
    assert (stats.state, stats.consecutive_failures, stats.opened_until) == (State.OPEN, 3, 12)
    assert not breaker.may_try(11.9)


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(SETTINGS)
    for event in [Event.FAILURE, Event.FAILURE, Event.SUCCESS, Event.FAILURE, Event.FAILURE]:
        breaker.apply(event, 0)
    assert breaker.state(0) is State.CLOSED
    assert breaker.statistics(0).consecutive_failures == 2


def test_after_the_open_period_exactly_one_trial_goes_through() -> None:
    breaker = _opened()
    assert breaker.state(10) is State.HALF_OPEN
    assert breaker.may_try(10) and breaker.needs_trial(10)
    breaker.begin_trial(10)
    assert breaker.state(11) is State.HALF_OPEN
    assert not breaker.may_try(11)
    with pytest.raises(BreakerError, match="trial in flight"):
        breaker.begin_trial(11)
    assert breaker.statistics(11).trial_in_flight


def test_trial_success_closes_and_resets_the_period() -> None:
    breaker = _trying()
    transition = breaker.apply(Event.TRIAL_SUCCEEDED, 12)
    assert transition == Transition(Event.TRIAL_SUCCEEDED, State.HALF_OPEN, State.CLOSED, 12)
    stats = breaker.statistics(12)
    assert (stats.state, stats.consecutive_failures, stats.opened_until, stats.open_for) == (
        State.CLOSED,
        0,
        None,
        10.0,
    )
    assert breaker.may_try(12) and not breaker.needs_trial(12)


def test_each_reopen_doubles_the_period_up_to_the_cap() -> None:
    breaker = _opened()
    now = 0.0
    periods = []
    for _ in range(5):
        now = breaker.statistics(now).opened_until or now
        breaker.begin_trial(now)
        assert breaker.apply(Event.TRIAL_FAILED, now) == Transition(
            Event.TRIAL_FAILED, State.HALF_OPEN, State.OPEN, now
        )
        periods.append((breaker.statistics(now).opened_until or now) - now)
    assert periods == [20, 40, 60, 60, 60]
    # A success that closes it resets the period: the next opening lasts open_for again.
    now = breaker.statistics(now).opened_until or now
    breaker.begin_trial(now)
    breaker.apply(Event.TRIAL_SUCCEEDED, now)
    for _ in range(3):
        breaker.apply(Event.FAILURE, now)
    assert breaker.statistics(now).opened_until == now + 10


def test_an_abandoned_trial_lets_another_one_through() -> None:
    breaker = _trying()
    assert breaker.apply(Event.TRIAL_ABANDONED, 11) is None
    assert breaker.needs_trial(11)
    breaker.begin_trial(11)
    assert breaker.statistics(11).trial_in_flight


@pytest.mark.parametrize("setup", ["open", "half-open", "trial"])
@pytest.mark.parametrize("event", [Event.SUCCESS, Event.FAILURE])
def test_outcomes_of_requests_from_before_the_opening_change_nothing(
    setup: str, event: Event
) -> None:
    breaker = SETUPS[setup]()
    before = breaker.statistics(5)
    assert breaker.apply(event, 5) is None
    assert breaker.statistics(5) == before


@attrs.frozen
class Illegal:
    setup: str
    event: Event


@pytest.mark.parametrize(
    "case",
    [
        Illegal("closed", Event.TRIAL_STARTED),
        Illegal("closed", Event.TRIAL_SUCCEEDED),
        Illegal("closed", Event.TRIAL_FAILED),
        Illegal("closed", Event.TRIAL_ABANDONED),
        Illegal("open", Event.TRIAL_STARTED),  # before the open period is over
        Illegal("open", Event.TRIAL_SUCCEEDED),
        Illegal("half-open", Event.TRIAL_FAILED),  # no trial was started
        Illegal("half-open", Event.TRIAL_ABANDONED),
        Illegal("trial", Event.TRIAL_STARTED),  # never two trials at once
    ],
)
def test_illegal_moves_raise_and_change_nothing(case: Illegal) -> None:
    breaker = SETUPS[case.setup]()
    before = breaker.statistics(5)
    with pytest.raises(BreakerError):
        breaker.apply(case.event, 5)
    assert breaker.statistics(5) == before


def test_statistics_count_transitions() -> None:
    breaker = _trying()
    breaker.apply(Event.TRIAL_FAILED, 10)
    breaker.begin_trial(30)
    breaker.apply(Event.TRIAL_SUCCEEDED, 30)
    # closed -> open -> (time) -> half-open -> open -> (time) -> half-open -> closed
    assert breaker.statistics(30).transitions == 3


@given(
    st.lists(
        st.tuples(st.sampled_from(Event), st.floats(0, 40, allow_nan=False)),
        max_size=60,
    )
)
def test_random_event_sequences_never_leave_an_invalid_state(
    steps: list[tuple[Event, float]],
) -> None:
    breaker = CircuitBreaker(SETTINGS)
    now = 0.0
    for event, elapsed in steps:
        now += elapsed
        before = breaker.statistics(now)
        try:
            transition = breaker.apply(event, now)
        except BreakerError:
            assert breaker.statistics(now) == before
            continue
        after = breaker.statistics(now)
        if transition is not None:
            assert (transition.before, transition.after) == (before.state, after.state)
            assert after.transitions == before.transitions + 1
        if event is Event.TRIAL_STARTED:
            # Only from half-open with no trial in flight: never two at once.
            assert before.state is State.HALF_OPEN and not before.trial_in_flight
        assert SETTINGS.open_for <= after.open_for <= SETTINGS.max_open_for
        if after.state is State.CLOSED:
            assert after.consecutive_failures < SETTINGS.failure_threshold
            assert after.opened_until is None and not after.trial_in_flight
        else:
            assert after.consecutive_failures >= SETTINGS.failure_threshold
            assert after.opened_until is not None
        if after.state is State.OPEN:
            assert after.opened_until is not None
            assert now < after.opened_until <= now + after.open_for
            assert not breaker.may_try(now)
        assert breaker.may_try(now) == (
            after.state is State.CLOSED
            or (after.state is State.HALF_OPEN and not after.trial_in_flight)
        )
