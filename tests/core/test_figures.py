"""Merging workers' figures: counters and histograms add up, gauges come from live workers only,
per-backend state is the worst any worker sees, and the JSON form carries everything."""

from __future__ import annotations

import calendar
import json
import time
from collections import Counter

import attrs

from ntonix.core.engines import LoadedModel, LoadReading
from ntonix.core.figures import Figures, merge, tier_up
from ntonix.core.figures_json import decode, encode
from ntonix.core.health import BackendSnapshot
from ntonix.core.ledger import UsageBook, UsageFigures
from ntonix.core.load_figures import BackendLoad
from ntonix.core.sessions import SessionCounts, SessionTallies
from ntonix.core.signals import LoadStatus
from ntonix.core.telemetry import RequestRecord, SecondSummary, Tallies, WindowSummary
from ntonix.core.usage import Usage


def _backend(name: str = "a", **changes: object) -> BackendSnapshot:
    snapshot = BackendSnapshot(
        name=name,
        weight=1,
        state="closed",
        consecutive_failures=0,
        in_flight=0,
        latency_ms=None,
        last_error="",
        models=("m",),
        retry_after_until=None,
        probe="ok",
        draining=False,
        reasons=(),
    )
    return attrs.evolve(snapshot, **changes)


def _tallies(requests: int, *, active: int = 0, ttft: float = 0.02) -> Tallies:
    tallies = Tallies()
    for _ in range(requests):
        tallies.begin()
        record = RequestRecord(
            started=0.0,
            wall_time=0.0,
            request_id=b"r",
            client="c",
            method="POST",
            path="/v1/chat/completions",
            cache="miss",
        )
        record.backend, record.status, record.bytes_in = "a", 200, 10
        record.note_body(100, lambda: ttft)
        tallies.finish(record, 0.05)
        tallies.attempts[("a", "completed")] += 1
    tallies.active = active
    return tallies


def _figures(requests: int, **changes: object) -> Figures:
    figures = Figures(
        workers=1,
        tallies=_tallies(requests),
        backends=(_backend(),),
        pools={"a": {"idle": 2, "in_use": 1, "opened": 3, "closed": 0, "reused": 5}},
        cache={"entries": 4, "bytes": 400, "hits": requests, "misses": 1, "max_entries": 10},
        transitions=Counter({("a", "closed", "open"): 1}),
        access_log_dropped=1,
        queued=1,
        window=None,
    )
    return attrs.evolve(figures, **changes)


def test_counters_and_histograms_add_up_over_all_workers() -> None:
    merged = merge([_figures(3), _figures(5)])
    assert merged.workers == 2
    assert merged.tallies.requests == Counter({("/v1/chat/completions", "a", "200", "miss"): 8})
    assert merged.tallies.attempts[("a", "completed")] == 8
    assert merged.tallies.durations["a"].count == 8
    assert merged.tallies.ttfts["a"].cumulative() == _tallies(8).ttfts["a"].cumulative()
    assert merged.tallies.bytes_in == 80 and merged.tallies.bytes_out["a"] == 800
    assert merged.cache == {"entries": 8, "bytes": 800, "hits": 8, "misses": 2, "max_entries": 20}
    assert merged.pools["a"] == {"idle": 4, "in_use": 2, "opened": 6, "closed": 0, "reused": 10}
    assert merged.transitions[("a", "closed", "open")] == 2
    assert merged.access_log_dropped == 2 and merged.queued == 2


def test_a_gone_worker_keeps_its_counts_but_not_its_gauges() -> None:
    live = _figures(3, tallies=_tallies(3, active=2), backends=(_backend(in_flight=2),))
    gone = _figures(5, tallies=_tallies(5, active=7), backends=(_backend(in_flight=7),))
    merged = merge([live], [gone])
    assert merged.workers == 1
    assert merged.tallies.requests.total() == 8  # its requests still happened
    assert merged.tallies.active == 2  # its in-flight requests died with it
    assert merged.backends[0].in_flight == 2
    assert merged.cache is not None
    assert (merged.cache["hits"], merged.cache["entries"], merged.cache["max_entries"]) == (
        8,
        4,
        10,
    )
    assert merged.pools["a"]["opened"] == 6 and merged.pools["a"]["idle"] == 2
    assert merged.queued == 1 and merged.access_log_dropped == 2
    assert gone.tallies.active == 7  # the gone worker's own figures are left as they were


def test_per_backend_the_worst_view_wins_and_in_flight_adds_up() -> None:
    calm = _backend(in_flight=1, latency_ms=100.0, models=("m",))
    failing = _backend(
        state="open",
        consecutive_failures=3,
        in_flight=2,
        latency_ms=300.0,
        last_error="connect refused",
        models=("m", "n"),
        probe="failing",
        reasons=("circuit open",),
    )
    unknown = _backend(probe="unknown", models=None, latency_ms=None, draining=True)
    (merged,) = merge([_figures(0, backends=(b,)) for b in (calm, failing, unknown)]).backends
    assert merged.state == "open" and merged.probe == "failing"
    assert merged.consecutive_failures == 3 and merged.in_flight == 3
    assert merged.latency_ms == 200.0
    assert merged.last_error == "connect refused"
    assert merged.models == ("m", "n") and merged.draining
    assert merged.reasons == ("circuit open",)


def test_backends_keep_the_first_workers_order_and_add_those_only_others_know() -> None:
    first = _figures(0, backends=(_backend("b"), _backend("a")))
    second = _figures(0, backends=(_backend("a"), _backend("c")))
    assert [b.name for b in merge([first, second]).backends] == ["b", "a", "c"]


def test_windows_add_rates_and_bound_the_percentiles() -> None:
    one = WindowSummary(
        requests_per_second=2.0,
        ttft_p50=0.1,
        ttft_p99=0.5,
        backend_ttft_p50={"a": 0.1},
        series=(SecondSummary(100, 3, 0.1, 0.5), SecondSummary(101, 1, 0.1, 0.1)),
    )
    other = WindowSummary(
        requests_per_second=1.0,
        ttft_p50=0.4,
        ttft_p99=0.9,
        backend_ttft_p50={"a": 0.4},
        series=(SecondSummary(100, 1, 0.4, 0.9), SecondSummary(101, 0, None, None)),
    )
    window = merge([_figures(0, window=one), _figures(0, window=other)]).window
    assert window is not None
    assert window.requests_per_second == 3.0
    assert window.ttft_p99 == 0.9  # never understates the tail
    assert window.ttft_p50 is not None and 0.1 < window.ttft_p50 < 0.4
    assert window.series == (
        SecondSummary(100, 4, (0.1 * 3 + 0.4) / 4, 0.9),
        SecondSummary(101, 1, 0.1, 0.1),
    )


def test_the_json_form_carries_every_figure() -> None:
    window = WindowSummary(1.5, 0.1, 0.2, {"a": 0.1}, (SecondSummary(7, 2, 0.1, 0.2),))
    figures = _figures(
        4,
        tallies=_tallies(4, active=1),
        backends=(_backend(reasons=("draining",), retry_after_until=12.5),),
        window=window,
    )
    back = decode(json.loads(json.dumps(encode(figures))))
    # A backend's back-off deadline is on its own worker's clock: it does not travel.
    expected = attrs.evolve(figures, backends=(_backend(reasons=("draining",)),))
    assert encode(back) == encode(expected)
    assert back.backends == expected.backends and back.window == window
    assert encode(merge([back])) == encode(merge([expected]))


def test_a_worker_without_a_cache_adds_nothing_to_it() -> None:
    assert merge([_figures(1, cache=None), _figures(1, cache=None)]).cache is None
    merged = merge([_figures(2), _figures(1, cache=None)])
    assert merged.cache is not None and merged.cache["hits"] == 2


def _usage(prompt: int, completion: int, cached: int, *, date: str = "2026-12-06") -> UsageFigures:
    book = UsageBook()
    wall = calendar.timegm(time.strptime(date + " 12", "%Y-%m-%d %H"))
    book.add("team-a", "m", Usage(prompt, completion), cached=False, now=10.0, wall=wall)
    book.add("team-a", "m", Usage(cached, 0, True), cached=True, now=10.0, wall=wall)
    return book.figures(30.0)


def test_tokens_add_up_over_workers_and_a_gone_workers_minute_is_not_this_minute() -> None:
    one = _figures(1, usage=_usage(10, 20, 5))
    two = _figures(1, usage=_usage(1, 2, 0))
    gone = _figures(1, usage=_usage(100, 200, 0, date="2026-12-05"))
    merged = merge([one, two], [gone])
    total = merged.usage.total
    assert total[("team-a", "m", "prompt")] == 111
    assert total[("team-a", "m", "completion")] == 222
    assert total[("team-a", "m", "cached")] == 5
    assert merged.usage.minute[("team-a", "m", "prompt")] == 11  # the live workers' only
    assert merged.usage.days["2026-12-06"][("team-a", "m", "completion")] == 22
    assert merged.usage.days["2026-12-05"][("team-a", "m", "completion")] == 200
    assert decode(json.loads(json.dumps(encode(merged)))).usage == merged.usage


def _sessions(ended: int, *, active: int) -> SessionTallies:
    sessions = SessionTallies(active=active)
    counts = SessionCounts()
    counts.messages_in, counts.messages_out, counts.closed_by = 2, 5, "client"
    for _ in range(ended):
        sessions.finish(
            backend="a", status=101, counts=counts, bytes_in=10, bytes_out=50, duration=3.0
        )
    return sessions


def test_websocket_sessions_add_up_and_travel_as_json() -> None:
    live = _figures(1, sessions=_sessions(2, active=1))
    gone = _figures(1, sessions=_sessions(3, active=4))
    merged = merge([live, live], [gone])
    assert merged.sessions.active == 2  # a gone worker's open sessions are not open
    assert merged.sessions.sessions == Counter({("a", "101"): 7})
    assert merged.sessions.messages == Counter({"to_backend": 14, "to_client": 35})
    assert merged.sessions.bytes == Counter({"to_backend": 70, "to_client": 350})
    assert merged.sessions.closes == Counter({"client": 7})
    assert merged.sessions.durations.count == 7
    back = decode(json.loads(json.dumps(encode(merged))))
    assert encode(back) == encode(merged)


def _tier(*, up: bool, calls: int) -> dict[str, int]:
    return {"workers_up": int(up), "calls": calls, "failures": 1, "skipped": 2, "transitions": 0}


def test_the_shared_tier_counts_add_up_and_only_live_workers_say_whether_it_is_up() -> None:
    merged = merge(
        [_figures(1, shared=_tier(up=True, calls=5)), _figures(1, shared=_tier(up=False, calls=3))],
        [_figures(1, shared=_tier(up=True, calls=7))],
    )
    assert merged.shared == {
        "workers_up": 1,  # of the 2 live workers: the gone one's view is not counted
        "calls": 15,
        "failures": 3,
        "skipped": 6,
        "transitions": 0,
    }
    assert merge([_figures(1), _figures(1)]).shared is None
    back = decode(json.loads(json.dumps(encode(merged))))
    assert back.shared == merged.shared
    assert not tier_up(merged) and tier_up(merge([_figures(1, shared=_tier(up=True, calls=1))]))


def _load(name: str, *, age: float | None, waiting: int, score: float, ramp: float) -> BackendLoad:
    reading = None
    if age is not None:
        models = (LoadedModel("llama3", "2026-12-06T19:00:00Z"),)
        reading = LoadReading("vllm", waiting, 2, 0.5, None, models)
    status = LoadStatus(
        engine="vllm" if reading else "",
        reading=reading,
        age=age,
        stale=False,
        error="" if reading else "connection refused",
        estimated_load=None if reading is None else waiting + 2,
        capacity=None if reading is None else 2,
        ramp=ramp,
        ttfb={"": 0.05 * score, "llama3": 0.04},
        hold=None if reading is None else 0.4 * score,
    )
    return BackendLoad(name, status, score)


def test_the_freshest_reading_wins_with_the_answering_workers_own_score() -> None:
    answering = _load("a", age=0.8, waiting=1, score=1.5, ramp=0.5)
    other = _load("a", age=0.1, waiting=4, score=3.0, ramp=1.0)
    unread = _load("b", age=None, waiting=0, score=0.0, ramp=1.0)
    merged = merge(
        [
            _figures(1, loads=(answering,)),
            _figures(1, loads=(other, _load("b", age=0.2, waiting=0, score=0.7, ramp=1.0))),
            _figures(1, loads=(unread,)),
        ],
        [_figures(1, loads=(_load("a", age=0.0, waiting=9, score=9.0, ramp=1.0),))],
    )
    a, b = merged.loads
    # The engine's account, from the worker that read it last (a gone worker's is not shown).
    assert (a.status.reading, a.status.age) == (other.status.reading, 0.1)
    # What the answering worker (the first) makes of it for its own next pick.
    assert a.score == 1.5 and a.status.ramp == 0.5 and a.status.ttfb == answering.status.ttfb
    assert a.status.hold == answering.status.hold
    assert a.status.estimated_load == answering.status.estimated_load
    # One the answering worker does not list (a reload under way): the first that does.
    assert b.name == "b" and b.status.age == 0.2 and b.status.engine == "vllm"
    assert b.score == 0.7
    assert decode(json.loads(json.dumps(encode(merged)))).loads == merged.loads
    assert merge([_figures(1, loads=(unread,))]).loads == (unread,)
