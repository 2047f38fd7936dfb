"""The issue's targets, each read from a run's results and judged met or missed.

Each target names the figure it reads; a figure that was not measured (a scenario left out with
`--only`) is "not run", never a pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bench.cache_bench import cache_results
from bench.results import Results


@dataclass(frozen=True)
class Target:
    label: str
    measure: Callable[[Results, int], tuple[float, str] | None]  # (value, shown) or not run
    met: Callable[[float], bool]


def _added_ttft(pick: str) -> Callable[[Results, int], tuple[float, str] | None]:
    def measure(results: Results, workers: int) -> tuple[float, str] | None:
        burst = results.burst.get(workers)
        if burst is None:
            return None
        value = burst.added_p50_ms if pick == "p50" else burst.added_p99_ms
        # The floor's own added TTFT under the same burst: what any app served this way adds.
        floor = burst.floor_added_p50_ms if pick == "p50" else burst.floor_added_p99_ms
        return value, f"{value:+.1f} ms (bare Hypercorn {floor:+.1f} ms)"

    return measure


def _rate_per_worker(results: Results, workers: int) -> tuple[float, str] | None:
    result = results.throughput.get(workers)
    if result is None:
        return None
    per_worker = result.gateway_rate / workers
    shown = f"{per_worker:,.0f} req/s per worker ({result.gateway_rate:,.0f} total"
    # The floor of (f) bounds what any app on Hypercorn gets from one process: the context.
    floor = results.floor.get(workers)
    if floor is not None:
        shown += f"; bare Hypercorn {floor.floor_rate:,.0f}"
    return per_worker, shown + ")"


def _slow_ok(results: Results, workers: int) -> tuple[float, str] | None:
    slow = results.slow.get(workers)
    if slow is None:
        return None
    failed = slow.gateway.total - slow.gateway.ok
    return failed, f"{slow.gateway.ok:,}/{slow.gateway.total:,} complete, {failed} errors"


def _slow_ttft(results: Results, workers: int) -> tuple[float, str] | None:
    slow = results.slow.get(workers)
    if slow is None:
        return None
    shown = (
        f"{slow.gateway.ttft_p99_ms:,.0f} ms (direct {slow.direct.ttft_p99_ms:,.0f} ms; "
        f"bare Hypercorn {slow.floor.ttft_p99_ms:,.0f} ms at {slow.floor.total:,} streams)"
    )
    return slow.gateway.ttft_p99_ms, shown


def _memory(results: Results, workers: int) -> tuple[float, str] | None:
    slow = results.slow.get(workers)
    if slow is None:
        return None
    note = "" if slow.all_open_seen else " (never saw all open)"
    return slow.per_stream_kib, f"{slow.per_stream_kib:.1f} KiB{note}"


def _close_p99(results: Results, workers: int) -> tuple[float, str] | None:
    result = results.disconnects.get(workers)
    if result is None:
        return None
    run = result.gateway
    missing = run.hung_up - run.noticed
    note = f", {missing} never noticed" if missing else ""
    value = run.p99_ms if not missing else math.inf
    return value, f"{run.p99_ms:.1f} ms{note}"


def _left_open(results: Results, workers: int) -> tuple[float, str] | None:
    result = results.disconnects.get(workers)
    if result is None:
        return None
    return result.gateway.left_open, f"{result.gateway.left_open} open"


def _cache_saving(results: Results, workers: int) -> tuple[float, str] | None:
    result = cache_results(results).get(workers)
    if result is None:
        return None
    saved = result.requests_saved
    shown = f"{saved:.1f}% ({result.off.backend_requests:,} -> {result.on.backend_requests:,})"
    return saved, shown


def _cache_answers(results: Results, workers: int) -> tuple[float, str] | None:
    result = cache_results(results).get(workers)
    if result is None:
        return None
    mismatches = result.off.mismatches + result.on.mismatches
    failed = result.off.failed + result.on.failed
    total = result.off.requests + result.on.requests
    return result.bad_answers, f"{mismatches} wrong, {failed} truncated of {total:,}"


def _cache_hit_latency(results: Results, workers: int) -> tuple[float, str] | None:
    result = cache_results(results).get(workers)
    if result is None:
        return None
    probe = result.probe
    shown = (
        f"{result.hit_added_ms:+.3f} ms (hit p50 {probe.hit_p50_ms:.3f}, floor "
        f"{probe.floor_p50_ms:.3f}, cache-off relay {probe.relay_p50_ms:.3f})"
    )
    return result.hit_added_ms, shown


TARGET_RATE = 2000  # non-streaming requests/s per worker

TARGETS = (
    Target("added TTFT p50 <= 10 ms (100-stream burst)", _added_ttft("p50"), lambda v: v <= 10),
    Target("added TTFT p99 <= 25 ms (100-stream burst)", _added_ttft("p99"), lambda v: v <= 25),
    Target(
        f">= {TARGET_RATE:,} non-streaming req/s per worker",
        _rate_per_worker,
        lambda v: v >= TARGET_RATE,
    ),
    Target("1,000 streams/worker at 2 tok/s, zero errors", _slow_ok, lambda v: v == 0),
    Target("... with TTFT p99 < 1 s", _slow_ttft, lambda v: v < 1000),
    Target("<= 40 KiB gateway memory per open stream", _memory, lambda v: v <= 40),
    Target("upstream closed <= 20 ms (p99) after client left", _close_p99, lambda v: v <= 20),
    Target("no upstream left open after disconnects", _left_open, lambda v: v == 0),
    Target(
        "cache: >= 40% fewer backend requests (Zipf workload of (g))",
        _cache_saving,
        lambda v: v >= 40,
    ),
    Target("cache: zero wrong or truncated answers (g)", _cache_answers, lambda v: v == 0),
    Target(
        "cache: hit p50 < 1 ms above the framework floor (g)",
        _cache_hit_latency,
        lambda v: v < 1,
    ),
)


def judge(results: Results, workers: list[int]) -> list[list[str]]:
    """One row per target: its label, then per worker count the figure and met / MISSED."""
    rows = []
    for target in TARGETS:
        cells: list[str] = [target.label]
        for count in workers:
            measured = target.measure(results, count)
            if measured is None:
                cells.append("not run")
            else:
                value, shown = measured
                cells.append(f"{shown} **{'met' if target.met(value) else 'MISSED'}**")
        rows.append(cells)
    return rows
