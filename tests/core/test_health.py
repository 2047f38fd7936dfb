import math

import attrs
import pytest

from ntonix.config import BackendSettings
from ntonix.core.balancer import Candidate
from ntonix.core.breaker import BreakerSettings, Event, State, Transition
from ntonix.core.health import (
    HealthTable,
    Outcome,
    Verdict,
    no_route_status,
    outcome_of_status,
    retry_after_of,
    verdict_of,
)

SETTINGS = BreakerSettings(failure_threshold=3, open_for=10.0, max_open_for=60.0)


@attrs.frozen
class Backend:
    name: str
    weight: int = 1
    models: tuple[str, ...] = ()


def _table(*backends: Backend) -> HealthTable:
    return HealthTable(backends or (Backend("a"), Backend("b")), SETTINGS)


def _request(table: HealthTable, name: str, outcome: Outcome, now: float = 0.0) -> None:
    ticket = table.begin(name, now)
    assert ticket is not None
    table.end(ticket, outcome, now)


def _probe(
    table: HealthTable,
    name: str,
    outcome: Outcome,
    now: float = 0.0,
    *,
    models: list[str] | None = None,
    error: str = "",
) -> None:
    ticket = table.begin_probe(name, now)
    assert ticket is not None and ticket.probe
    table.end(ticket, outcome, now, models=models, error=error)


def _state(table: HealthTable, name: str, now: float = 0.0) -> str:
    return next(s.state for s in table.snapshot(now) if s.name == name)


@pytest.mark.parametrize(
    ("outcome", "verdict"),
    [
        (Outcome.COMPLETED, Verdict.ALIVE),
        (Outcome.UPSTREAM_4XX, Verdict.ALIVE),
        (Outcome.UPSTREAM_429, Verdict.ALIVE),
        (Outcome.CONNECT_FAILED, Verdict.FAILED),
        (Outcome.TIMED_OUT, Verdict.FAILED),
        (Outcome.UPSTREAM_5XX, Verdict.FAILED),
        (Outcome.FAILED_MIDSTREAM, Verdict.FAILED),
        (Outcome.CLIENT_DISCONNECTED, Verdict.NEUTRAL),
    ],
)
def test_the_table_judges_outcomes(outcome: Outcome, verdict: Verdict) -> None:
    assert verdict_of(outcome) is verdict


@pytest.mark.parametrize(
    "outcome",
    [Outcome.CONNECT_FAILED, Outcome.TIMED_OUT, Outcome.UPSTREAM_5XX, Outcome.FAILED_MIDSTREAM],
)
def test_threshold_failures_eject_a_backend(outcome: Outcome) -> None:
    table = _table()
    for _ in range(3):
        _request(table, "a", outcome)
    assert table.eligible(None, 1) == ["b"]
    assert _state(table, "a") == "open"
    [reason] = table.why_not("a", 1)
    assert "circuit open for 9.0 s more after 3 failures" in reason
    assert outcome.value in reason


def test_4xx_never_ejects() -> None:
    table = _table()
    for _ in range(20):
        _request(table, "a", Outcome.UPSTREAM_4XX)
    assert table.eligible(None, 0) == ["a", "b"]
    # It proves the backend alive: it resets the failure count.
    _request(table, "a", Outcome.UPSTREAM_5XX)
    _request(table, "a", Outcome.UPSTREAM_5XX)
    _request(table, "a", Outcome.UPSTREAM_4XX)
    _request(table, "a", Outcome.UPSTREAM_5XX)
    assert table.snapshot(0)[0].consecutive_failures == 1


def test_client_disconnect_is_neutral() -> None:
    table = _table()
    _request(table, "a", Outcome.UPSTREAM_5XX)
    _request(table, "a", Outcome.UPSTREAM_5XX)
    for _ in range(5):
        _request(table, "a", Outcome.CLIENT_DISCONNECTED)
    assert table.snapshot(0)[0].consecutive_failures == 2
    assert table.snapshot(0)[0].last_error == "upstream_5xx"
    _request(table, "a", Outcome.UPSTREAM_5XX)  # still consecutive: the disconnects did not count
    assert _state(table, "a") == "open"


def test_429_skips_the_backend_for_its_retry_after_without_ejecting_it() -> None:
    table = _table()
    ticket = table.begin("a", 0)
    assert ticket is not None
    table.end(ticket, Outcome.UPSTREAM_429, 0, retry_after=2.5)
    assert table.eligible(None, 2.4) == ["b"]
    assert table.why_not("a", 2) == ["backing off after a 429 for 0.5 s more"]
    assert table.begin("a", 2) is None
    snapshot = table.snapshot(2)[0]
    assert (snapshot.state, snapshot.consecutive_failures) == ("closed", 0)
    assert snapshot.retry_after_until == 2.5
    assert table.eligible(None, 2.5) == ["a", "b"]
    assert table.snapshot(2.5)[0].retry_after_until is None


@pytest.mark.parametrize(
    ("retry_after", "skipped_for"),
    [(None, 1.0), (0.0, 1.0), (-3.0, 1.0), (math.nan, 1.0), (0.2, 0.2), (3600.0, 60.0)],
)
def test_429_retry_after_defaults_to_1s_and_is_capped(
    retry_after: float | None, skipped_for: float
) -> None:
    table = _table()
    ticket = table.begin("a", 0)
    assert ticket is not None
    table.end(ticket, Outcome.UPSTREAM_429, 0, retry_after=retry_after)
    assert table.snapshot(0)[0].retry_after_until == skipped_for


def test_a_half_open_backend_gets_exactly_one_trial() -> None:
    table = _table()
    for _ in range(3):
        _request(table, "a", Outcome.CONNECT_FAILED)
    assert table.eligible(None, 10) == ["a", "b"]  # half-open, trial free
    trial = table.begin("a", 10)
    assert trial is not None and trial.trial
    assert table.eligible(None, 10) == ["b"]
    assert table.why_not("a", 10) == ["half-open: the trial request is in flight"]
    assert table.begin("a", 11) is None
    probe = table.begin_probe("a", 11)  # probes still run; they just cannot be the trial now
    assert probe is not None and not probe.trial
    transition = table.end(trial, Outcome.COMPLETED, 12)
    assert transition == Transition(Event.TRIAL_SUCCEEDED, State.HALF_OPEN, State.CLOSED, 12)
    assert table.eligible(None, 12) == ["a", "b"]


def test_a_failed_trial_reopens_for_twice_as_long() -> None:
    table = _table()
    for _ in range(3):
        _request(table, "a", Outcome.CONNECT_FAILED)
    trial = table.begin("a", 10)
    assert trial is not None
    table.end(trial, Outcome.TIMED_OUT, 10, error="no first byte within 60 s")
    assert table.eligible(None, 29) == ["b"]
    assert table.eligible(None, 30) == ["a", "b"]
    assert table.snapshot(10)[0].last_error == "no first byte within 60 s"


def test_a_client_leaving_during_the_trial_frees_it() -> None:
    table = _table()
    for _ in range(3):
        _request(table, "a", Outcome.CONNECT_FAILED)
    trial = table.begin("a", 10)
    assert trial is not None
    assert table.end(trial, Outcome.CLIENT_DISCONNECTED, 10) is None
    retrial = table.begin("a", 10)
    assert retrial is not None and retrial.trial


def test_a_request_from_before_the_opening_does_not_decide_the_trial() -> None:
    table = _table()
    long_stream = table.begin("a", 0)
    assert long_stream is not None
    for _ in range(3):
        _request(table, "a", Outcome.CONNECT_FAILED)
    trial = table.begin("a", 10)
    assert trial is not None
    assert table.end(long_stream, Outcome.COMPLETED, 11) is None
    assert table.why_not("a", 11) == ["half-open: the trial request is in flight"]


def test_a_probe_can_be_the_trial() -> None:
    table = _table()
    for _ in range(3):
        _request(table, "a", Outcome.CONNECT_FAILED)
    probe = table.begin_probe("a", 10)
    assert probe is not None and probe.trial
    assert table.begin("a", 10) is None
    table.end(probe, Outcome.COMPLETED, 10)
    assert _state(table, "a", 10) == "closed"


def test_failing_probes_take_a_backend_out_even_with_live_successes_between() -> None:
    table = _table()
    for _ in range(2):
        _probe(table, "a", Outcome.TIMED_OUT, error="probe timed out")
        _request(table, "a", Outcome.COMPLETED)
    _probe(table, "a", Outcome.TIMED_OUT, error="probe timed out")
    assert _state(table, "a") == "closed"  # the breaker saw successes between the failures
    assert table.why_not("a", 0) == ["health probe failed 3 times in a row (last: probe timed out)"]
    assert table.snapshot(0)[0].probe == "failing"
    _probe(table, "a", Outcome.COMPLETED)
    assert table.eligible(None, 0) == ["a", "b"]
    assert table.snapshot(0)[0].probe == "ok"


def test_not_ready_until_a_backend_has_answered() -> None:
    table = _table()
    assert not table.ready(0)  # closed circuits, but nothing has answered yet
    _probe(table, "a", Outcome.CONNECT_FAILED)
    _request(table, "b", Outcome.TIMED_OUT)
    _request(table, "b", Outcome.CLIENT_DISCONNECTED)  # proves nothing
    _probe(table, "b", Outcome.UPSTREAM_5XX)
    assert not table.ready(0)
    _probe(table, "a", Outcome.COMPLETED)
    assert table.ready(0)


@pytest.mark.parametrize("outcome", [Outcome.COMPLETED, Outcome.UPSTREAM_4XX, Outcome.UPSTREAM_429])
def test_a_request_answered_by_a_backend_makes_the_table_ready(outcome: Outcome) -> None:
    table = _table()
    _request(table, "a", outcome)
    assert table.ready(0)  # a 429's back-off is a moment, not ill health


def test_not_ready_once_every_backend_that_answered_is_out() -> None:
    table = _table()
    _probe(table, "a", Outcome.COMPLETED)
    for _ in range(3):
        _request(table, "a", Outcome.UPSTREAM_5XX)
    assert _state(table, "a") == "open"
    assert not table.ready(1)  # b never answered: it does not count
    trial = table.begin("a", 10)  # half-open, its trial in flight: not ejected any more
    assert trial is not None and trial.trial and table.ready(10)
    table.end(trial, Outcome.COMPLETED, 10)
    for _ in range(3):
        _probe(table, "a", Outcome.TIMED_OUT, 11)
    assert not table.ready(11)


def test_every_circuit_change_is_told_once_with_its_reason() -> None:
    changes: list[str] = []
    table = HealthTable([Backend("a")], SETTINGS, on_change=lambda c: changes.append(str(c)))
    stale = table.begin("a", 0)
    assert stale is not None
    _request(table, "a", Outcome.CONNECT_FAILED, 0)
    _probe(table, "a", Outcome.CONNECT_FAILED, 0, error="connection refused by h:1")
    _request(table, "a", Outcome.TIMED_OUT, 0)
    table.end(stale, Outcome.COMPLETED, 0)  # began before the opening: changes nothing
    abandoned = table.begin("a", 10)  # the open period is over: a request is the trial
    assert abandoned is not None
    table.end(abandoned, Outcome.CLIENT_DISCONNECTED, 10)  # no verdict: still half-open
    _probe(table, "a", Outcome.TIMED_OUT, 10, error="health probe timed out after 2.0 s")
    _probe(table, "a", Outcome.COMPLETED, 30)
    assert changes == [
        "backend a: circuit closed -> open: 3 failures in a row, the last: timed_out; "
        "open for 10 s",
        "backend a: circuit open -> half-open: open for 10 s; a request is the trial",
        "backend a: circuit half-open -> open: the trial failed: "
        "health probe timed out after 2.0 s; open for 20 s",
        "backend a: circuit open -> half-open: open for 20 s; a health probe is the trial",
        "backend a: circuit half-open -> closed: the trial (a health probe) succeeded",
    ]


def test_in_flight_counts_requests_not_probes() -> None:
    table = _table()
    one, two = table.begin("a", 0), table.begin("a", 0)
    probe = table.begin_probe("a", 0)
    assert one is not None and two is not None and probe is not None
    assert table.candidates(["a", "b", "gone"]) == [Candidate("a", 1, 2), Candidate("b", 1, 0)]
    table.end(one, Outcome.COMPLETED, 1)
    assert table.snapshot(1)[0].in_flight == 1
    with pytest.raises(ValueError, match="already ended"):
        table.end(one, Outcome.COMPLETED, 1)
    assert table.snapshot(1)[0].in_flight == 1


def test_latency_is_an_ewma_of_completed_requests_time_to_first_byte() -> None:
    table = _table()
    for outcome, ttfb in [
        (Outcome.COMPLETED, 0.100),
        (Outcome.COMPLETED, 0.200),
        (Outcome.UPSTREAM_4XX, 5.0),  # a fast reject or slow error says nothing about speed
        (Outcome.UPSTREAM_5XX, 5.0),
    ]:
        ticket = table.begin("a", 0)
        assert ticket is not None
        table.end(ticket, outcome, 0, ttfb=ttfb)
    assert table.snapshot(0)[0].latency_ms == pytest.approx(120.0)
    assert table.snapshot(0)[1].latency_ms is None


# --- models --------------------------------------------------------------------------------


@attrs.frozen
class Routing:
    model: str | None
    eligible: tuple[str, ...]
    serving: tuple[str, ...]
    status: int | None


@pytest.mark.parametrize(
    "case",
    [
        Routing(None, ("cfg", "learned", "any"), ("cfg", "learned", "any"), None),
        Routing("llama3", ("cfg", "any"), ("cfg", "any"), None),
        Routing("llama3:latest", ("any",), ("any",), None),  # config names are exact
        Routing("qwen", ("learned", "any"), ("learned", "any"), None),
        Routing("qwen2:7b", ("any",), ("any",), None),
        Routing("mistral", ("learned", "any"), ("learned", "any"), None),  # mistral:latest
    ],
)
def test_a_request_goes_only_to_backends_that_serve_its_model(case: Routing) -> None:
    table = _table(Backend("cfg", models=("llama3",)), Backend("learned"), Backend("any"))
    _probe(table, "learned", Outcome.COMPLETED, models=["qwen", "mistral:latest"])
    _probe(table, "any", Outcome.COMPLETED, models=[])  # an empty list teaches nothing
    assert tuple(table.eligible(case.model, 0)) == case.eligible
    assert tuple(table.serving(case.model)) == case.serving


def test_unknown_model_is_404_and_a_model_whose_backends_are_down_is_503() -> None:
    table = _table(Backend("a", models=("llama3",)), Backend("b", models=("qwen",)))
    for _ in range(3):
        _request(table, "a", Outcome.CONNECT_FAILED)
    for model, status in [("qwen", None), ("llama3", 503), ("gpt-4", 404)]:
        verdict = no_route_status(serving=table.serving(model), eligible=table.eligible(model, 1))
        assert verdict == status, model


@pytest.mark.parametrize(
    ("serving", "eligible", "status"),
    [((), (), 404), (("a",), (), 503), (("a", "b"), ("b",), None)],
)
def test_no_route_status(serving: tuple[str], eligible: tuple[str], status: int | None) -> None:
    assert no_route_status(serving=serving, eligible=eligible) == status


def test_retry_after_is_the_soonest_return_of_a_serving_backend() -> None:
    table = _table(Backend("a", models=("m",)), Backend("b", models=("m",)), Backend("c"))
    assert table.retry_after("m", 0) == 1
    for _ in range(3):
        _request(table, "a", Outcome.CONNECT_FAILED)
    ticket = table.begin("b", 0)
    assert ticket is not None
    table.end(ticket, Outcome.UPSTREAM_429, 0, retry_after=30)
    assert table.retry_after("m", 0) == 10
    assert table.retry_after("m", 8.5) == 2
    assert table.retry_after("m", 10) == 20


def test_served_models_are_the_union_over_eligible_backends() -> None:
    table = _table(Backend("a", models=("llama3",)), Backend("b"), Backend("c"))
    _probe(table, "b", Outcome.COMPLETED, models=["qwen", "llama3"])
    assert table.served_models(0) == ["llama3", "qwen"]
    for _ in range(3):
        _request(table, "b", Outcome.UPSTREAM_5XX)
    assert table.served_models(0) == ["llama3"]


# --- config reload -------------------------------------------------------------------------


def test_reconcile_keeps_health_of_kept_backends_and_follows_weights() -> None:
    table = _table(Backend("a"), Backend("b"))
    for _ in range(3):
        _request(table, "a", Outcome.CONNECT_FAILED)
    table.reconcile([Backend("b", weight=3), Backend("a", weight=2), Backend("c")])
    assert table.names == ["b", "a", "c"]
    assert _state(table, "a") == "open"
    assert table.candidates(table.eligible(None, 0)) == [Candidate("b", 3), Candidate("c", 1)]


def test_a_removed_backend_drains_its_streams_then_goes() -> None:
    table = _table(Backend("a"), Backend("b"))
    stream = table.begin("a", 0)
    assert stream is not None
    table.reconcile([Backend("b")])
    assert table.eligible(None, 0) == ["b"]
    assert table.serving(None) == ["b"]
    assert table.why_not("a", 0) == ["draining: removed from the config, 1 in flight"]
    assert [s.draining for s in table.snapshot(0)] == [False, True]
    table.end(stream, Outcome.COMPLETED, 5)
    assert table.names == ["b"]
    assert table.why_not("a", 5) == ["not configured"]


def test_a_backend_added_back_while_draining_is_kept() -> None:
    table = _table(Backend("a"), Backend("b"))
    stream = table.begin("a", 0)
    assert stream is not None
    table.reconcile([Backend("b")])
    table.reconcile([Backend("b"), Backend("a")])
    assert table.eligible(None, 0) == ["b", "a"]
    table.end(stream, Outcome.COMPLETED, 1)
    assert table.names == ["b", "a"]


def test_tickets_of_a_removed_backend_are_ignored() -> None:
    table = _table(Backend("a"), Backend("b"))
    probe = table.begin_probe("a", 0)
    assert probe is not None
    table.reconcile([Backend("b")])  # no requests in flight: dropped at once
    table.reconcile([Backend("b"), Backend("a")])  # a new incarnation
    assert table.end(probe, Outcome.CONNECT_FAILED, 1) is None
    assert table.snapshot(1)[1].probe == "unknown"
    assert table.begin_probe("gone", 1) is None


def test_config_backends_fit_the_table() -> None:
    backends = [
        BackendSettings(name="gpu-a", url="http://127.0.0.1:1", weight=2, models=("m",)),
        BackendSettings(name="gpu-b", url="http://127.0.0.1:2"),
    ]
    table = HealthTable(backends, SETTINGS)
    assert table.candidates(table.eligible("m", 0)) == [Candidate("gpu-a", 2), Candidate("gpu-b")]


def test_snapshot_shows_what_the_status_page_needs() -> None:
    table = _table(Backend("a", models=("m2", "m1")))
    for _ in range(3):
        _request(table, "a", Outcome.UPSTREAM_5XX)
    [snapshot] = table.snapshot(4)
    assert attrs.asdict(snapshot) == {
        "name": "a",
        "weight": 1,
        "state": "open",
        "consecutive_failures": 3,
        "in_flight": 0,
        "latency_ms": None,
        "last_error": "upstream_5xx",
        "models": ("m1", "m2"),
        "retry_after_until": None,
        "probe": "unknown",
        "draining": False,
        "reasons": ("circuit open for 6.0 s more after 3 failures (last: upstream_5xx)",),
    }


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.COMPLETED),
        (304, Outcome.COMPLETED),
        (400, Outcome.UPSTREAM_4XX),
        (413, Outcome.UPSTREAM_4XX),
        (429, Outcome.UPSTREAM_429),
        (500, Outcome.UPSTREAM_5XX),
        (503, Outcome.UPSTREAM_5XX),
    ],
)
def test_outcome_of_a_response_status(status: int, outcome: Outcome) -> None:
    assert outcome_of_status(status) is outcome


def test_retry_after_in_seconds_only() -> None:
    assert retry_after_of([(b"retry-after", b"2.5")]) == 2.5
    assert retry_after_of([(b"retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")]) is None
    assert retry_after_of([]) is None
