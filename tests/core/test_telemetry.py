"""The counters behind /metrics and the dashboard's last minute."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.telemetry import (
    LATENCY_BUCKETS,
    Histogram,
    RecentWindow,
    RequestRecord,
    Tallies,
    percentile,
    route_of,
)

durations = st.floats(min_value=0, max_value=1e4, allow_nan=False)


@given(st.lists(durations))
def test_histogram_buckets_are_cumulative_and_end_with_the_count(values: list[float]) -> None:
    histogram = Histogram()
    for value in values:
        histogram.observe(value)
    buckets = histogram.cumulative()
    assert [bound for bound, _ in buckets] == [*LATENCY_BUCKETS, math.inf]
    for bound, count in buckets:
        assert count == sum(value <= bound for value in values)
    assert histogram.count == len(values)
    assert math.isclose(histogram.total, sum(values))


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    histogram = Histogram((0.1, 1.0))
    histogram.observe(0.1)
    assert histogram.cumulative() == [(0.1, 1), (1.0, 1), (math.inf, 1)]


@given(st.lists(durations, min_size=1), st.floats(min_value=0.01, max_value=1))
def test_percentile_is_a_sample_with_enough_below_it(values: list[float], q: float) -> None:
    ordered = sorted(values)
    result = percentile(ordered, q)
    assert result in ordered
    assert sum(v <= result for v in ordered) >= q * len(ordered)
    assert sum(v < result for v in ordered) < q * len(ordered)


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 0.5) is None


def _record(**fields: object) -> RequestRecord:
    record = RequestRecord(
        started=10.0,
        wall_time=0.0,
        request_id=b"r",
        client="c",
        method="POST",
        path="/v1/chat/completions",
        cache="miss",
    )
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def test_tallies_count_a_finished_request_under_its_labels() -> None:
    tallies = Tallies()
    tallies.begin()
    record = _record(backend="a", status=200, first_byte_at=10.5, chunks=3, bytes_out=30)
    tallies.finish(record, now=12.0)
    assert tallies.active == 0
    assert tallies.requests == {("/v1/chat/completions", "a", "200", "miss"): 1}
    assert tallies.durations["a"].total == 2.0
    assert tallies.ttfts["a"].total == 0.5
    assert (tallies.chunks["a"], tallies.bytes_out["a"]) == (3, 30)


def test_errors_have_no_ttft_and_a_disconnect_counts_by_phase() -> None:
    tallies = Tallies()
    tallies.begin()
    tallies.finish(_record(status=502, first_byte_at=10.1), now=11)
    tallies.begin()
    tallies.finish(_record(status=499, disconnected=True, phase="queue"), now=11)
    assert tallies.ttfts == {}
    assert tallies.disconnects == {"queue": 1}


def test_invented_paths_share_one_route_label() -> None:
    assert route_of("/v1/chat/completions") == "/v1/chat/completions"
    assert route_of("/v1/anything/else") == "other"


def test_the_window_summarises_the_last_minute_second_by_second() -> None:
    window = RecentWindow(seconds=60)
    for second in range(100, 130):
        for ttft in (0.1, 0.2, 0.3):
            window.add(second + 0.5, "a", ttft)
    window.add(129.9, "b", None)  # an error: counted, no TTFT
    summary = window.summary(now=130.2)
    assert len(summary.series) == 60
    assert summary.series[-1].at == 130 and summary.series[-1].requests == 0
    assert summary.series[-2].requests == 4
    assert summary.series[-2].ttft_p50 == 0.2 and summary.series[-2].ttft_p99 == 0.3
    assert summary.requests_per_second == (10 * 3 + 1) / 10
    assert summary.ttft_p50 == 0.2 and summary.ttft_p99 == 0.3
    assert summary.backend_ttft_p50 == {"a": 0.2}


def test_the_window_forgets_what_is_older_than_a_minute() -> None:
    window = RecentWindow(seconds=60)
    window.add(100.0, "a", 5.0)
    window.add(200.0, "a", 0.1)
    summary = window.summary(now=200.5)
    assert summary.ttft_p99 == 0.1
    assert sum(second.requests for second in summary.series) == 1


def test_a_busy_second_keeps_a_bounded_uniform_sample() -> None:
    window = RecentWindow(seconds=60, samples_per_second=100, rng=random.Random(7))
    for i in range(10_000):
        window.add(50.5, "a", i / 10_000)
    summary = window.summary(now=50.9)
    assert summary.series[-1].requests == 10_000
    assert summary.ttft_p50 is not None and 0.35 < summary.ttft_p50 < 0.65
