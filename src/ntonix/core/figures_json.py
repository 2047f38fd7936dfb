"""Figures as JSON: how a worker hands its figures to the one answering for the gateway.

Invariants this module owns:
- `decode(encode(f))` gives `f` back, but for a backend's `retry_after_until`: a time on one
  worker's Trio clock means nothing to another.
- `encode` returns what `json.dumps` takes: counters keyed by tuples travel as rows.
- `decode` of anything `encode` did not give raises KeyError, TypeError or ValueError.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ntonix.core.figures import Figures
from ntonix.core.health import BackendSnapshot
from ntonix.core.ledger import UsageFigures
from ntonix.core.load_figures import decode_loads, encode_loads
from ntonix.core.sessions import SessionTallies
from ntonix.core.telemetry import Histogram, SecondSummary, Tallies, WindowSummary


def encode(figures: Figures) -> dict[str, Any]:
    tallies = figures.tallies
    return {
        "workers": figures.workers,
        "tallies": {
            "requests": _rows(tallies.requests),
            "durations": _histogram_rows(tallies.durations),
            "ttfts": _histogram_rows(tallies.ttfts),
            "chunks": dict(tallies.chunks),
            "bytes_out": dict(tallies.bytes_out),
            "bytes_in": tallies.bytes_in,
            "active": tallies.active,
            "queue_wait": _histogram_row(tallies.queue_wait),
            "attempts": _rows(tallies.attempts),
            "retries": dict(tallies.retries),
            "failovers": dict(tallies.failovers),
            "disconnects": dict(tallies.disconnects),
            "cancellations": dict(tallies.cancellations),
        },
        "backends": [attrs.asdict(snapshot) for snapshot in figures.backends],
        "pools": figures.pools,
        "cache": figures.cache,
        "transitions": _rows(figures.transitions),
        "access_log_dropped": figures.access_log_dropped,
        "queued": figures.queued,
        "window": None if figures.window is None else attrs.asdict(figures.window),
        "usage": {
            "total": _rows(figures.usage.total),
            "minute": _rows(figures.usage.minute),
            "days": {date: _rows(rows) for date, rows in figures.usage.days.items()},
        },
        "sessions": {
            "active": figures.sessions.active,
            "sessions": _rows(figures.sessions.sessions),
            "closes": dict(figures.sessions.closes),
            "messages": dict(figures.sessions.messages),
            "bytes": dict(figures.sessions.bytes),
            "durations": _histogram_row(figures.sessions.durations),
        },
        "shared": figures.shared,
        "loads": encode_loads(figures.loads),
    }


def decode(data: Mapping[str, Any]) -> Figures:
    """The figures `encode` gave; KeyError, TypeError or ValueError if `data` is not such."""
    raw = data["tallies"]
    tallies = Tallies(
        requests=_counter(raw["requests"]),
        durations=_histograms(raw["durations"]),
        ttfts=_histograms(raw["ttfts"]),
        chunks=Counter(raw["chunks"]),
        bytes_out=Counter(raw["bytes_out"]),
        bytes_in=int(raw["bytes_in"]),
        active=int(raw["active"]),
        queue_wait=_histogram(raw["queue_wait"]),
        attempts=_counter(raw["attempts"]),
        retries=Counter(raw["retries"]),
        failovers=Counter(raw["failovers"]),
        disconnects=Counter(raw["disconnects"]),
        cancellations=Counter(raw["cancellations"]),
    )
    window = data["window"]
    usage = data["usage"]
    raw_sessions = data["sessions"]
    sessions = SessionTallies(
        active=int(raw_sessions["active"]),
        sessions=_counter(raw_sessions["sessions"]),
        closes=Counter(raw_sessions["closes"]),
        messages=Counter(raw_sessions["messages"]),
        bytes=Counter(raw_sessions["bytes"]),
        durations=_histogram(raw_sessions["durations"]),
    )
    return Figures(
        workers=int(data["workers"]),
        tallies=tallies,
        backends=tuple(_backend(snapshot) for snapshot in data["backends"]),
        pools={name: dict(stats) for name, stats in data["pools"].items()},
        cache=None if data["cache"] is None else dict(data["cache"]),
        transitions=_counter(data["transitions"]),
        access_log_dropped=int(data["access_log_dropped"]),
        queued=int(data["queued"]),
        window=None if window is None else _window(window),
        usage=UsageFigures(
            _counter(usage["total"]),
            _counter(usage["minute"]),
            {str(date): _counter(rows) for date, rows in usage["days"].items()},
        ),
        sessions=sessions,
        shared=None if data["shared"] is None else {k: int(v) for k, v in data["shared"].items()},
        loads=decode_loads(data["loads"]),
    )


def _rows(counter: Mapping[Any, int]) -> list[list[Any]]:
    return [[*labels, count] for labels, count in counter.items()]


def _counter(rows: Iterable[list[Any]]) -> Counter[Any]:
    return Counter({tuple(str(label) for label in row[:-1]): int(row[-1]) for row in rows})


def _histogram_row(histogram: Histogram) -> dict[str, Any]:
    return {"bounds": histogram.bounds, "counts": histogram.counts, "total": histogram.total}


def _histogram_rows(histograms: Mapping[str, Histogram]) -> dict[str, dict[str, Any]]:
    return {key: _histogram_row(histogram) for key, histogram in histograms.items()}


def _histogram(row: Mapping[str, Any]) -> Histogram:
    histogram = Histogram(tuple(float(bound) for bound in row["bounds"]))
    counts = [int(count) for count in row["counts"]]
    if len(counts) != len(histogram.counts):
        raise ValueError("a histogram's counts do not match its bounds")
    histogram.counts = counts
    histogram.count = sum(counts)
    histogram.total = float(row["total"])
    return histogram


def _histograms(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Histogram]:
    return {key: _histogram(row) for key, row in rows.items()}


def _backend(data: Mapping[str, Any]) -> BackendSnapshot:
    models = data["models"]
    return BackendSnapshot(
        **{
            **data,
            "models": None if models is None else tuple(models),
            "reasons": tuple(data["reasons"]),
            "retry_after_until": None,
        }
    )


def _window(data: Mapping[str, Any]) -> WindowSummary:
    return WindowSummary(
        requests_per_second=data["requests_per_second"],
        ttft_p50=data["ttft_p50"],
        ttft_p99=data["ttft_p99"],
        backend_ttft_p50=dict(data["backend_ttft_p50"]),
        series=tuple(SecondSummary(**second) for second in data["series"]),
    )
