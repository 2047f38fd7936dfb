"""The issue's targets, each read from a run's results and judged met or missed.

Each target names the figure it reads; a figure that was not measured (a scenario left out with
`--only`) is "not run", never a pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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
    return value, f"{run.p99_ms:.1f} ms (the mock's loop noticed at {run.noticed_p99_ms:.1f}){note}"


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


def _costs(
    figure: str,
) -> Callable[[Results, int], tuple[float, str] | None]:
    """A row of (i): gateway / floor in the same run (the floor in as many processes)."""

    def measure(results: Results, workers: int) -> tuple[float, str] | None:
        costs = results.costs.get(workers)
        if costs is None or (figure.startswith("many") and not costs.many):
            return None
        if figure == "open cpu":
            pairs = costs.open
            value = costs.open_cpu_ratio
            shown = "CPU s " + _pairs(p.gateway.cpu_s for p in pairs)
            shown += " vs floor " + _pairs(p.floor.cpu_s for p in pairs)
        elif figure == "open ttft":
            value = costs.open_ttft_ratio
            shown = "p99 ms " + _pairs(p.gateway.run.ttft_p99_ms for p in costs.open)
            shown += " vs floor " + _pairs(p.floor.run.ttft_p99_ms for p in costs.open)
        elif figure == "many errors":
            run = costs.many[0].gateway.run
            return run.total - run.ok, f"{run.ok:,}/{run.total:,} complete"
        elif figure == "many ttft":
            value = costs.many_ttft_ratio
            pair = costs.many[0]
            shown = (
                f"p99 {pair.gateway.run.ttft_p99_ms:,.0f} ms vs floor "
                f"{pair.floor.run.ttft_p99_ms:,.0f} ms ({costs.floor_processes} processes)"
            )
        else:
            value = costs.token_ratio
            shown = "µs/token " + _pairs(costs.token_us("gateway"))
            shown += " vs floor " + _pairs(costs.token_us("floor"))
        return value, f"{value:.2f}x ({shown})"

    return measure


def _pairs(values: Iterable[float]) -> str:
    return "/".join(f"{v:,.0f}" if v >= 10 else f"{v:.2f}" for v in values)


def _own_us(results: Results, workers: int) -> tuple[float, str] | None:
    floor = results.floor.get(workers)
    if floor is None:
        return None
    return floor.own_us, (
        f"{floor.own_us:,.0f} µs (gateway {floor.gateway_us:,.0f}, floor {floor.floor_us:,.0f})"
    )


def _own_burst(pick: str) -> Callable[[Results, int], tuple[float, str] | None]:
    def measure(results: Results, workers: int) -> tuple[float, str] | None:
        burst = results.burst.get(workers)
        if burst is None:
            return None
        value = burst.own_p50_ms if pick == "p50" else burst.own_p99_ms
        return value, f"{value:+.1f} ms"

    return measure


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
    Target("<= 32 KiB gateway memory per open stream", _memory, lambda v: v <= 32),
    Target("upstream closed <= 15 ms (p99) after client left", _close_p99, lambda v: v <= 15),
    Target("no upstream left open after disconnects", _left_open, lambda v: v == 0),
    Target(
        "CPU of a 1,000-stream burst (1 token, first after 0.5 s), gateway / floor <= 1.25x (i)",
        _costs("open cpu"),
        lambda v: v <= 1.25,
    ),
    Target(
        "TTFT p99 of that burst, gateway / floor <= 1.25x (i)",
        _costs("open ttft"),
        lambda v: v <= 1.25,
    ),
    Target("5,000 streams at 2 tok/s: zero errors (i)", _costs("many errors"), lambda v: v == 0),
    Target("... TTFT p99, gateway / floor <= 1.5x (i)", _costs("many ttft"), lambda v: v <= 1.5),
    Target(
        "CPU per relayed token at 10 tok/s (500 streams), gateway / floor <= 1.3x (i)",
        _costs("token"),
        lambda v: v <= 1.3,
    ),
    Target(
        "gateway's own CPU per non-streaming request (gateway - floor) <= 250 µs (f)",
        _own_us,
        lambda v: v <= 250,
    ),
    Target(
        "100-stream burst: TTFT p50 above the floor's <= +10 ms (b)",
        _own_burst("p50"),
        lambda v: v <= 10,
    ),
    Target(
        "100-stream burst: TTFT p99 above the floor's <= +30 ms (b)",
        _own_burst("p99"),
        lambda v: v <= 30,
    ),
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
