"""One worker's figures, and a whole gateway's: everything /metrics, /ntonix/status and the
dashboard show, as plain data that crosses a process boundary as JSON and sums across workers.

Invariants: `merge` sums every counter and histogram over all the workers it is given, the
ones that are gone included, so that a worker that stopped or died never takes its counts out
of the gateway's (a counter shown never goes backwards while the gateway runs); gauges (what is
in progress or held now) come only from the live workers. Per backend, what describes the
backend rather than the traffic is the worst any live worker sees: the breaker state, the
probe, the failures in a row. The engines' load per backend merges as core/load_figures.py says:
the freshest reading of any live worker, the answering worker's (the first live one's) score.
The shared tier's `workers_up` is a gauge like the others: summed
over the live workers, it says how many of them use the tier now (each worker's is 0 or 1).
How figures cross a process boundary is `figures_json.py`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import attrs

from ntonix.core.health import BackendSnapshot
from ntonix.core.ledger import UsageFigures
from ntonix.core.load_figures import BackendLoad, merge_loads
from ntonix.core.sessions import SessionTallies
from ntonix.core.telemetry import Histogram, SecondSummary, Tallies, WindowSummary

# Fields of the pools' and the cache's statistics that say what is held now, not what happened:
# a gone worker's count of them is zero. Every other field is a counter.
POOL_GAUGES = frozenset({"idle", "in_use"})
CACHE_GAUGES = frozenset({"entries", "bytes", "flights", "max_entries", "max_bytes"})
SHARED_GAUGES = frozenset({"workers_up"})

# Worst first: a backend one worker sees open is open for the gateway.
_STATE_ORDER = ("open", "half-open", "closed")
_PROBE_ORDER = ("failing", "unknown", "ok")


@attrs.frozen
class Figures:
    """What one worker counts and sees (`workers == 1`), or the gateway's, merged."""

    workers: int
    tallies: Tallies
    backends: tuple[BackendSnapshot, ...]
    pools: dict[str, dict[str, int]]
    cache: dict[str, int] | None
    transitions: Counter[tuple[str, str, str]]
    access_log_dropped: int
    queued: int
    # The dashboard's last minute, on the wall clock (each process has its own Trio clock);
    # None when the reader did not ask for it.
    window: WindowSummary | None
    # Tokens per key and model: since start and per UTC day are counters, the last minute a
    # gauge (what a gone worker served a minute ago is not shown as this minute's).
    usage: UsageFigures = attrs.field(factory=UsageFigures)
    sessions: SessionTallies = attrs.field(factory=SessionTallies)  # WebSocket sessions
    # The shared tier (Valkey): workers_up, and its calls, failures, skipped and transitions;
    # None without a tier.
    shared: dict[str, int] | None = None
    # The engines' load signals per backend and this worker's least-loaded score.
    loads: tuple[BackendLoad, ...] = ()


def tier_up(figures: Figures) -> bool:
    """The shared tier is up for the gateway only while every live worker uses it: one that
    went on without it caches and limits on its own."""
    tier = figures.shared
    return tier is not None and 0 < figures.workers == tier["workers_up"]


def merge(live: Sequence[Figures], gone: Iterable[Figures] = ()) -> Figures:
    """The gateway's figures: counters summed over `live` and `gone`, gauges over `live`."""
    everyone = [*live, *(_without_gauges(figures) for figures in gone)]
    windows = [figures.window for figures in live if figures.window is not None]
    caches = [figures.cache for figures in everyone if figures.cache is not None]
    tiers = [figures.shared for figures in everyone if figures.shared is not None]
    return Figures(
        workers=len(live),
        tallies=_sum_tallies([figures.tallies for figures in everyone]),
        backends=_merge_backends([figures.backends for figures in live]),
        pools=_sum_by_name([figures.pools for figures in everyone]),
        cache=_sum_numbers(caches) if caches else None,
        transitions=sum((figures.transitions for figures in everyone), Counter()),
        access_log_dropped=sum(figures.access_log_dropped for figures in everyone),
        queued=sum(figures.queued for figures in live),
        window=_merge_windows(windows) if windows else None,
        usage=_merge_usage([figures.usage for figures in everyone]),
        sessions=_sum_sessions([figures.sessions for figures in everyone]),
        shared=_sum_numbers(tiers) if tiers else None,
        loads=merge_loads([figures.loads for figures in live]),
    )


def _merge_usage(all_usage: Sequence[UsageFigures]) -> UsageFigures:
    merged = UsageFigures()
    for usage in all_usage:
        merged.total.update(usage.total)
        merged.minute.update(usage.minute)
        for date, rows in usage.days.items():
            merged.days.setdefault(date, Counter()).update(rows)
    return merged


def _without_gauges(figures: Figures) -> Figures:
    tallies = _copy_tallies(figures.tallies)
    tallies.active = 0
    sessions = _sum_sessions([figures.sessions])
    sessions.active = 0
    pools = {
        name: {key: 0 if key in POOL_GAUGES else value for key, value in stats.items()}
        for name, stats in figures.pools.items()
    }
    cache = None
    if figures.cache is not None:
        cache = {k: 0 if k in CACHE_GAUGES else v for k, v in figures.cache.items()}
    shared = None
    if figures.shared is not None:
        shared = {k: 0 if k in SHARED_GAUGES else v for k, v in figures.shared.items()}
    usage = UsageFigures(figures.usage.total, Counter(), figures.usage.days)
    return attrs.evolve(
        figures,
        tallies=tallies,
        backends=(),
        pools=pools,
        cache=cache,
        queued=0,
        window=None,
        usage=usage,
        sessions=sessions,
        shared=shared,
        loads=(),
    )


def _sum_tallies(all_tallies: Sequence[Tallies]) -> Tallies:
    total = Tallies()
    for tallies in all_tallies:
        total.requests.update(tallies.requests)
        _add_histograms(total.durations, tallies.durations)
        _add_histograms(total.ttfts, tallies.ttfts)
        total.chunks.update(tallies.chunks)
        total.bytes_out.update(tallies.bytes_out)
        total.bytes_in += tallies.bytes_in
        total.active += tallies.active
        _add_histogram(total.queue_wait, tallies.queue_wait)
        total.attempts.update(tallies.attempts)
        total.retries.update(tallies.retries)
        total.failovers.update(tallies.failovers)
        total.disconnects.update(tallies.disconnects)
        total.cancellations.update(tallies.cancellations)
    return total


def _sum_sessions(all_sessions: Sequence[SessionTallies]) -> SessionTallies:
    total = SessionTallies()
    for sessions in all_sessions:
        total.active += sessions.active
        total.sessions.update(sessions.sessions)
        total.closes.update(sessions.closes)
        total.messages.update(sessions.messages)
        total.bytes.update(sessions.bytes)
        _add_histogram(total.durations, sessions.durations)
    return total


def _copy_tallies(tallies: Tallies) -> Tallies:
    return _sum_tallies([tallies])


def _add_histograms(into: dict[str, Histogram], more: Mapping[str, Histogram]) -> None:
    for key, histogram in more.items():
        _add_histogram(into.setdefault(key, Histogram(histogram.bounds)), histogram)


def _add_histogram(into: Histogram, more: Histogram) -> None:
    if into.bounds != more.bounds:
        raise ValueError(f"histogram bounds differ: {into.bounds} and {more.bounds}")
    into.counts = [a + b for a, b in zip(into.counts, more.counts, strict=True)]
    into.count += more.count
    into.total += more.total


def _sum_numbers(dicts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for numbers in dicts:
        total.update(numbers)
    return dict(total)


def _sum_by_name(by_name: Iterable[Mapping[str, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    grouped: dict[str, list[Mapping[str, int]]] = {}
    for mapping in by_name:
        for name, numbers in mapping.items():
            grouped.setdefault(name, []).append(numbers)
    return {name: _sum_numbers(numbers) for name, numbers in grouped.items()}


def _merge_backends(views: Sequence[tuple[BackendSnapshot, ...]]) -> tuple[BackendSnapshot, ...]:
    """One snapshot per backend, in the order the first worker lists them."""
    by_name: dict[str, list[BackendSnapshot]] = {}
    for view in views:
        for snapshot in view:
            by_name.setdefault(snapshot.name, []).append(snapshot)
    return tuple(_merge_backend(snapshots) for snapshots in by_name.values())


def _merge_backend(snapshots: list[BackendSnapshot]) -> BackendSnapshot:
    worst = min(snapshots, key=lambda s: _STATE_ORDER.index(s.state))
    latencies = [s.latency_ms for s in snapshots if s.latency_ms is not None]
    known = [s.models for s in snapshots if s.models is not None]
    errors = [s.last_error for s in sorted(snapshots, key=_badness) if s.last_error]
    return BackendSnapshot(
        name=worst.name,
        weight=worst.weight,
        state=worst.state,
        consecutive_failures=max(s.consecutive_failures for s in snapshots),
        in_flight=sum(s.in_flight for s in snapshots),
        latency_ms=sum(latencies) / len(latencies) if latencies else None,
        last_error=errors[0] if errors else "",
        models=tuple(dict.fromkeys(m for models in known for m in models)) if known else None,
        # A time on one worker's Trio clock means nothing on another's: the reasons say it.
        retry_after_until=None,
        probe=min((s.probe for s in snapshots), key=_PROBE_ORDER.index),
        draining=any(s.draining for s in snapshots),
        reasons=tuple(dict.fromkeys(r for s in snapshots for r in s.reasons)),
    )


def _badness(snapshot: BackendSnapshot) -> tuple[int, int]:
    return (_STATE_ORDER.index(snapshot.state), -snapshot.consecutive_failures)


def _merge_windows(windows: Sequence[WindowSummary]) -> WindowSummary:
    """Rates add up. A percentile of the union of the workers' requests lies between the
    workers' own: the median shown is their mean weighted by requests, the p99 the highest
    (so it never understates the tail)."""
    seconds: dict[int, list[SecondSummary]] = {}
    for window in windows:
        for second in window.series:
            seconds.setdefault(second.at, []).append(second)
    series = tuple(
        SecondSummary(
            at,
            sum(s.requests for s in same),
            _weighted([(s.ttft_p50, s.requests) for s in same]),
            _highest(s.ttft_p99 for s in same),
        )
        for at, same in sorted(seconds.items())[-max(len(w.series) for w in windows) :]
    )
    weights = [sum(s.requests for s in window.series) for window in windows]
    backend_medians: dict[str, list[tuple[float | None, int]]] = {}
    for window, weight in zip(windows, weights, strict=True):
        for name, median in window.backend_ttft_p50.items():
            backend_medians.setdefault(name, []).append((median, weight))
    merged_medians = {name: _weighted(pairs) for name, pairs in backend_medians.items()}
    return WindowSummary(
        requests_per_second=sum(window.requests_per_second for window in windows),
        ttft_p50=_weighted([(w.ttft_p50, n) for w, n in zip(windows, weights, strict=True)]),
        ttft_p99=_highest(window.ttft_p99 for window in windows),
        backend_ttft_p50={k: v for k, v in merged_medians.items() if v is not None},
        series=series,
    )


def _weighted(pairs: Iterable[tuple[float | None, int]]) -> float | None:
    known = [(value, max(weight, 1)) for value, weight in pairs if value is not None]
    if not known:
        return None
    return sum(value * weight for value, weight in known) / sum(weight for _, weight in known)


def _highest(values: Iterable[float | None]) -> float | None:
    return max((value for value in values if value is not None), default=None)
