"""The Markdown report: the targets table first, then one table per scenario.

Every gateway figure sits next to its direct twin from the same run; CPU columns are percent of
one core over the scenario, so a column near 100% (or the machine's total near 100% x cores)
names whoever was saturated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from bench.cache_bench import CacheResult, CacheRun, cache_results, ideal_saving
from bench.profile import Profile
from bench.results import ClientsRun, Results
from bench.scenarios import StreamRun, Throughput
from bench.stats import median
from bench.targets import TARGET_RATE, judge

_OWN_ROLES = ("gateway", "mocks", "load")
CPU_ROLES = (*_OWN_ROLES, "others", "machine")
_NO_CPU = [""] * len(CPU_ROLES)
_CONNECTIONS = "64 keep-alive connections"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _cpu(cpu: dict[str, float], roles: Iterable[str] = CPU_ROLES) -> list[str]:
    # "others": what the machine did beyond the processes we measured (our three roles, or the
    # floor of (f)): the kernel's network work, and whatever else shares the machine (other
    # people's test runs show up here).
    measured = sum(percent for role, percent in cpu.items() if role != "machine")
    shown = {**cpu, "others": max(cpu.get("machine", math.nan) - measured, 0.0)}
    return ["-" if role not in shown else f"{shown[role]:.0f}%" for role in roles]


# Runs at the floor and through the gateway side by side: the server's CPU in one column.
_SERVER_ROLES = ("server", "mocks", "load", "others", "machine")


def _server_cpu(server: str, cpu: dict[str, float]) -> list[str]:
    """`cpu` with the role named `server` (gateway or floor) shown as "server"; a direct run
    has none, its servers are the mocks."""
    renamed = {("server" if role == server else role): percent for role, percent in cpu.items()}
    return _cpu(renamed, _SERVER_ROLES)


def _server_cpu_header() -> list[str]:
    return [f"CPU {role}" for role in _SERVER_ROLES]


def _us(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def _errors(run: StreamRun) -> str:
    if not run.errors:
        return "0"
    return "; ".join(f"{count} x {message}" for message, count in run.errors.items())


# --- the targets -------------------------------------------------------------------------------


def _targets(results: Results, workers: list[int]) -> list[str]:
    header = ["target", *(f"{w} worker{'s' if w > 1 else ''}" for w in workers)]
    return _table(header, judge(results, workers))


# --- the scenario tables -----------------------------------------------------------------------


def _throughput(results: Results) -> list[str]:
    rows = []
    for workers, result in sorted(results.throughput.items()):
        for index, (direct, gateway) in enumerate(result.pairs):
            for path, run in (("direct", direct), ("gateway", gateway)):
                rows.append(
                    [
                        workers,
                        index + 1,
                        path,
                        f"{run.rate:,.0f}",
                        _ms(run.p50_ms),
                        _ms(run.p99_ms),
                        run.errors,
                        _us(run.cpu_us("gateway")) if path == "gateway" else "",
                        *_cpu(run.cpu),
                    ]
                )
        median_rows = [
            ("gateway", f"{result.gateway_rate:,.0f}", f"**{_us(result.gateway_us)}**"),
            ("gateway / direct", f"{result.ratio:.2f}", ""),
        ]
        for path, shown, us in median_rows:
            rows.append([workers, "**median**", path, f"**{shown}**", "", "", "", us, *_NO_CPU])
    header = [
        "workers",
        "repeat",
        "path",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "gateway CPU µs/req",
        *_cpu_header(),
    ]
    return _table(header, rows)


def _floor(results: Results) -> list[str]:
    summary = []
    rows = []
    for workers, result in sorted(results.floor.items()):
        summary.append(
            [
                workers,
                f"{result.floor_rate:,.0f}",
                _latencies([floor for floor, _ in result.pairs]),
                _us(result.floor_us),
                f"{result.gateway_rate:,.0f}",
                _latencies([gateway for _, gateway in result.pairs]),
                _us(result.gateway_us),
                f"**{_us(result.own_us)}**",
            ]
        )
        for index, (floor, gateway) in enumerate(result.pairs):
            for server, run in (("floor", floor), ("gateway", gateway)):
                rows.append([workers, index + 1, *_floor_run(server, run)])
    lines = _table(
        [
            "workers",
            "floor req/s",
            "floor p50 / p99 ms",
            "floor CPU µs/req",
            "gateway req/s",
            "gateway p50 / p99 ms",
            "gateway CPU µs/req",
            "gateway's own µs/req",
        ],
        summary,
    )
    lines += [
        "The floor is a minimal ASGI app (reads the body, answers a fixed 8-token completion) "
        "served with the gateway's Hypercorn settings by Hypercorn's trio worker in one "
        "process: its rate is the most any Hypercorn app can do per worker on this machine, so the "
        f">= {TARGET_RATE:,} req/s per worker target cannot be met while the floor itself is "
        "below it, and gateway minus floor CPU per request is the share of the gateway's own "
        "code (the median over the pairs). Medians of "
        f"{max(len(r.pairs) for r in results.floor.values())} floor/gateway pair(s); the floor "
        "is one process whatever the gateway's worker count.",
        "",
    ]
    header = ["workers", "repeat", "server", "req/s", "p50 ms", "p99 ms", "errors", "CPU µs/req"]
    lines += _table([*header, *_server_cpu_header()], rows)
    return lines


def _latencies(runs: list[Throughput]) -> str:
    """Median p50 / median p99 over the repeats."""
    return f"{_ms(median([r.p50_ms for r in runs]))} / {_ms(median([r.p99_ms for r in runs]))}"


def _floor_run(server: str, run: Throughput) -> list[str]:
    return [
        server,
        f"{run.rate:,.0f}",
        _ms(run.p50_ms),
        _ms(run.p99_ms),
        str(run.errors),
        _us(run.cpu_us(server)),
        *_server_cpu(server, run.cpu),
    ]


def _cpu_header() -> list[str]:
    return [f"CPU {role}" for role in CPU_ROLES]


def _burst(results: Results) -> list[str]:
    rows = []
    for workers, result in sorted(results.burst.items()):
        for index, repeat in enumerate(result.repeats):
            direct = repeat.direct
            for path, run in (
                ("direct", direct),
                ("floor", repeat.floor),
                ("gateway", repeat.gateway),
            ):
                vs_direct = path != "direct"
                rows.append(
                    [
                        workers,
                        index + 1,
                        path,
                        _ms(run.ttft_p50_ms),
                        _ms(run.ttft_p99_ms),
                        f"{run.ttft_p50_ms - direct.ttft_p50_ms:+.1f}" if vs_direct else "",
                        f"{run.ttft_p99_ms - direct.ttft_p99_ms:+.1f}" if vs_direct else "",
                        run.total - run.ok,
                        *_server_cpu(path, run.cpu),
                    ]
                )
        medians = (
            ("floor - direct", result.floor_added_p50_ms, result.floor_added_p99_ms),
            ("gateway - direct", result.added_p50_ms, result.added_p99_ms),
            ("gateway - floor", result.own_p50_ms, result.own_p99_ms),
        )
        for label, p50, p99 in medians:
            medians_shown = [f"**{p50:+.1f}**", f"**{p99:+.1f}**"]
            rows.append([workers, "**median**", label, "", "", *medians_shown, "", *_NO_CPU])
    lines = [
        "Each repeat sends the same burst straight at the backends (*direct*: two "
        "`bench.backend`s, the mock's replies at a tenth of its CPU, as in (i)), at the framework "
        "floor of (f) (*floor*: a bare Hypercorn app, one process, that plays the mock's stream "
        "itself: same events, sizes and delays) and through a gateway in front of those "
        "backends, in turn, after one unmeasured burst at each server. *added* is "
        "the run's TTFT minus the same repeat's direct TTFT: for the floor, what Hypercorn and "
        "Trio alone add to a burst like this, whatever the app; gateway minus floor is the "
        "gateway's own share, the part a change to its code can win back. The floor is one "
        "process: set it against one worker. *CPU server*: the gateway or the floor.",
        "",
    ]
    header = [
        "workers",
        "repeat",
        "path",
        "TTFT p50",
        "TTFT p99",
        "added p50",
        "added p99",
        "errors",
        *_server_cpu_header(),
    ]
    return lines + _table(header, rows)


def _slow(results: Results) -> list[str]:
    rows = []
    memory = []
    for workers, result in sorted(results.slow.items()):
        runs = (("direct", result.direct), ("gateway", result.gateway), ("floor", result.floor))
        for path, run in runs:
            rows.append(
                [
                    workers,
                    path,
                    f"{run.ok:,}/{run.total:,}",
                    _errors(run),
                    _ms(run.ttft_p50_ms),
                    _ms(run.ttft_p99_ms),
                    *_server_cpu(path, run.cpu),
                ]
            )
        memory.append(
            [
                workers,
                f"{result.idle_rss_kib / 1024:.1f}",
                f"{result.open_rss_kib / 1024:.1f}" + ("" if result.all_open_seen else " (*)"),
                f"{result.per_stream_kib:.1f}",
                f"{result.peak_rss_kib / 1024:.1f}",
                f"{result.worker_peak_kib / 1024:.1f}",
            ]
        )
    lines = [
        "*floor*: the framework floor of (f) playing the mock's slow stream itself, with one "
        "worker's share of the streams (it is one process): its TTFT is what Hypercorn and Trio "
        "alone give that many streams opened at once. *CPU server*: the gateway or the floor.",
        "",
    ]
    header = ["workers", "path", "complete", "errors", "TTFT p50 ms", "TTFT p99 ms"]
    lines += _table([*header, *_server_cpu_header()], rows)
    lines += _table(
        [
            "workers",
            "idle RSS MiB",
            "RSS all streams open MiB",
            "KiB per open stream",
            "peak RSS (VmHWM, all processes) MiB",
            "peak RSS of one worker MiB",
        ],
        memory,
    )
    if any(not r.all_open_seen for r in results.slow.values()):
        lines += [
            "(*) no sample saw every stream open at the mocks; the largest sample is shown.",
            "",
        ]
    return lines


def _costs(results: Results) -> list[str]:
    rows = []
    for workers, result in sorted(results.costs.items()):
        loads = (
            ("open", result.open),
            ("relay, 1 token", result.relay_one),
            ("relay, 21 tokens", result.relay_many),
            ("many", result.many),
        )
        for load, pairs in loads:
            for repeat, pair in enumerate(pairs):
                for side, costed in (("floor", pair.floor), ("gateway", pair.gateway)):
                    run = costed.run
                    rows.append(
                        [
                            workers,
                            load,
                            repeat,
                            side,
                            f"{run.ok:,}/{run.total:,}",
                            _errors(run),
                            _ms(run.ttft_p50_ms),
                            _ms(run.ttft_p99_ms),
                            _ms(run.connect_p99_ms),
                            f"{costed.cpu_s:.2f}",
                            f"{costed.backends_cpu_s:.2f}",
                        ]
                    )
    per_token = [
        [
            workers,
            ", ".join(f"{v:.0f}" for v in result.token_us("floor")),
            ", ".join(f"{v:.0f}" for v in result.token_us("gateway")),
            f"{result.token_ratio:.2f}x",
        ]
        for workers, result in sorted(results.costs.items())
    ]
    lines = [
        "*open*: streams opened at once, 1 token each, the first after 0.5 s; *relay*: streams "
        "at 10 tokens/s, with 21 tokens and with 1 (per token = the difference / 20 tokens per "
        "stream); *many*: 5,000 streams at 2 tokens/s (2 workers or more). The floor runs as "
        "many processes as the gateway has workers; the gateway has two `bench.backend`s of its "
        "own. *CPU s*: the server's own user + system time from the first connect to the last "
        "stream's end (all its processes); *backends CPU s*: its backends' meanwhile. *connect*: "
        "the client's connect(), part of TTFT (a SYN dropped from a full listen queue costs "
        "1 s).",
        "",
    ]
    header = ["workers", "load", "repeat", "server", "complete", "errors", "TTFT p50 ms"]
    timing = ["TTFT p99 ms", "connect p99 ms"]
    lines += _table([*header, *timing, "CPU s", "backends CPU s"], rows)
    lines += _table(
        ["workers", "floor µs/token", "gateway µs/token", "gateway / floor (median)"], per_token
    )
    return lines


def _disconnects(results: Results) -> list[str]:
    rows = []
    for workers, result in sorted(results.disconnects.items()):
        runs = [(str(i + 1), pair) for i, pair in enumerate(result.pairs)]
        if len(result.pairs) > 1:
            runs.append(("**all**", (result.direct, result.gateway)))
        for repeat, (direct, gateway) in runs:
            for path, run in (("direct", direct), ("gateway", gateway)):
                rows.append(
                    [
                        workers,
                        repeat,
                        path,
                        run.streams,
                        run.hung_up,
                        run.noticed,
                        _ms(run.p50_ms),
                        _ms(run.p99_ms),
                        _ms(run.max_ms),
                        _ms(run.noticed_p50_ms),
                        _ms(run.noticed_p99_ms),
                        ", ".join(f"{clock} {n}" for clock, n in sorted(run.clocks.items())),
                        run.left_open,
                        *_cpu(run.cpu),
                    ]
                )
    header = [
        "workers",
        "repeat",
        "path",
        "streams",
        "hung up",
        "noticed by mock",
        "closed p50 ms",
        "closed p99 ms",
        "closed max ms",
        "mock noticed p50 ms",
        "mock noticed p99 ms",
        "closed timed by",
        "left open",
        *_cpu_header(),
    ]
    return _table(header, rows)


def _clients(run: ClientsRun) -> list[str]:
    result = run.result
    rows = []
    for label, rate in (
        ("httpx.AsyncClient (trio)", result.httpx),
        ("ntonix BackendPool", result.pool),
    ):
        cpu = 100 * rate.cpu / result.seconds
        rows.append([label, f"{rate.rate:,.0f}", rate.errors, f"{cpu:.0f}%"])
    ratio = result.pool.rate / max(result.httpx.rate, 1e-9)
    rows.append(["**BackendPool / httpx**", f"**{ratio:.1f}x**", "", ""])
    lines = _table(["upstream client", "req/s (64 concurrent)", "errors", "client CPU"], rows)
    lines += [f"Mocks' CPU over the whole scenario: {run.mocks_cpu:.0f}%.", ""]
    leak_rows = []
    for label, leak in (
        ("httpx, Limits(max_connections=100)", result.httpx_leak),
        ("ntonix BackendPool, max_concurrent=100", result.pool_leak),
    ):
        state = ", ".join(f"{key} {value}" for key, value in leak.details.items()) or "-"
        verdict = "**recovered**" if leak.probe_failures == 0 else "**LEAKED**"
        leak_rows.append(
            [label, leak.storm_errors, leak.probe_failures, leak.probe_errors, state, verdict]
        )
    lines += _table(
        [
            "pool",
            "storm errors",
            "probe: pool timeouts of 100",
            "probe: other errors",
            "pool state after the storm",
            "verdict",
        ],
        leak_rows,
    )
    return lines


def _cache_run_row(workers: int, result: CacheResult, run: CacheRun) -> list[object]:
    p50 = run.latency_p50_ms
    off = result.off
    labels = run.labels
    return [
        workers,
        "on" if run.cache else "off",
        f"{run.backend_requests:,}",
        f"**{result.requests_saved:.1f}%**" if run.cache else "",
        f"{run.backend_token_seconds:,.1f}",
        f"**{result.token_seconds_saved:.1f}%**" if run.cache else "",
        " / ".join(f"{labels.get(name, 0):,}" for name in ("hit", "coalesced", "miss"))
        if run.cache
        else "-",
        _ms(p50.get("all", math.nan)),
        _ms(p50.get("hit", math.nan)),
        _ms(p50.get("coalesced", math.nan)),
        _ms(p50.get("miss", math.nan) if run.cache else off.latency_p50_ms.get("all", math.nan)),
        run.mismatches,
        run.failed,
        f"{run.seconds:.1f}",
        f"{run.cpu_seconds.get('gateway', math.nan):.1f} / {run.cpu_seconds.get('mocks', 0):.1f}",
    ]


def _cache(results: dict[int, CacheResult]) -> list[str]:
    some = next(iter(results.values()))
    workload = some.workload
    rows = []
    probes = []
    samples: list[str] = []
    notes: list[str] = []
    for workers, result in sorted(results.items()):
        for run in (result.off, result.on):
            rows.append(_cache_run_row(workers, result, run))
            samples += [f"{workers} worker(s), cache {run.cache}: {s}" for s in run.failure_samples]
            if run.backend_requests != run.backend_completed:
                samples.append(
                    f"{workers} worker(s), cache {run.cache}: the mocks completed "
                    f"{run.backend_completed} of {run.backend_requests} requests"
                )
        cache = result.on.status_cache
        if cache:
            # /ntonix/status (every worker's cache, summed) must agree with the x-ntonix-cache
            # headers the clients saw.
            told = {name: result.on.labels.get(name, 0) for name in ("hit", "coalesced", "miss")}
            kept = {
                name: cache.get(counter, 0)
                for name, counter in (
                    ("hit", "hits"),
                    ("coalesced", "coalesced"),
                    ("miss", "misses"),
                )
            }
            if told != kept:
                samples.append(f"/ntonix/status counted {kept}, the clients saw {told}")
        held = (
            f"{cache.get('entries', 0):,} entries, {cache.get('bytes', 0):,} bytes, "
            f"{cache.get('hits', 0):,} hits, {cache.get('misses', 0):,} misses, "
            f"{cache.get('coalesced', 0):,} coalesced"
            if cache
            else "-"
        )
        notes.append(f"{workers} worker(s), /ntonix/status after the run (all workers): {held}.")
        extra = result.on.backend_requests - result.distinct
        if extra:
            notes.append(
                f"{workers} worker(s): {extra} backend request(s) beyond one per distinct request."
            )
        served = result.on.labels.get("miss", 0) + result.on.labels.get("bypass", 0)
        if served != result.on.backend_requests:
            samples.append(
                f"{workers} worker(s): {served} misses but the mocks counted "
                f"{result.on.backend_requests} requests"
            )
        probe = result.probe
        probes.append(
            [
                workers,
                f"{probe.floor_p50_ms:.3f}",
                f"{probe.relay_p50_ms:.3f}",
                f"{probe.hit_p50_ms:.3f}",
                f"**{result.hit_added_ms:+.3f}**",
                f"{probe.hit_p50_ms - probe.relay_p50_ms:+.3f}",
                f"{probe.stream_hit_p50_ms:.3f}",
                probe.not_hits,
            ]
        )
    lines = [
        f"Workload: {workload.describe()}. It holds {some.distinct:,} distinct requests, so a "
        f"cache that never forgets and coalesces every duplicate in flight needs "
        f"{some.distinct:,} backend requests: at most {ideal_saving(workload):.1f}% saved. "
        "Backend requests are what the mocks counted (`/mock/stats`); backend token-seconds "
        "are tokens x token delay summed over the requests the backends served (every request "
        "without the cache, the misses with it). Each answer is compared byte for byte with the "
        "mock's own answer to the same request, fetched directly once per distinct request.",
        "",
    ]
    lines += _table(
        [
            "workers",
            "cache",
            "backend requests",
            "saved",
            "backend token-s",
            "saved",
            "answers hit / coalesced / miss",
            "p50 ms all",
            "p50 hit",
            "p50 coalesced",
            "p50 miss (off: all)",
            "wrong",
            "truncated or failed",
            "wall s",
            "CPU s gateway / mocks",
        ],
        rows,
    )
    if notes:
        lines += [*(f"- {note}" for note in notes), ""]
    if samples:
        lines += ["Problems seen:", "", *(f"- {sample}" for sample in samples), ""]
    lines += [
        f"Hit latency, one request at a time on a keep-alive connection, "
        f"{some.probe.requests} requests per target in {workload.probe_rounds} rounds (targets "
        "in turn, after a warm-up round), p50 in ms. *floor*: the framework floor of (f), a "
        "bare Hypercorn app answering a fixed 316-byte completion, i.e. what any app served "
        "this way costs; *relay*: the cache-off gateway relaying the mock's 8-token answer "
        "(sent at once); *hit*: the cache-on gateway answering that same request from the "
        "cache. The target reads hit minus floor.",
        "",
    ]
    lines += _table(
        [
            "workers",
            "floor",
            "cache-off relay",
            "hit",
            "hit - floor",
            "hit - relay",
            "streamed hit (16 tokens, 18 events)",
            "probe answers not hits",
        ],
        probes,
    )
    return lines


def _profiles(profiles: dict[int, Profile]) -> list[str]:
    lines: list[str] = []
    for workers, profile in sorted(profiles.items()):
        lines += [
            f"Gateway under the load of (a), {workers} worker(s), {profile.samples:,} samples "
            "(a separate run: py-spy slows the gateway down, the figures above are unprofiled).",
            "",
            f"Per-request metrics and access log: **{profile.telemetry:.1f}%** of the samples "
            "in which the gateway worked (budget: 5%; a thread waiting for work is not work).",
            "",
        ]
        lines += _table(["own time", "function"], [[f"{p:.1f}%", f] for p, f in profile.own])
        lines += _table(
            ["inclusive time", "gateway or Hypercorn function"],
            [[f"{p:.1f}%", f] for p, f in profile.inclusive],
        )
    return lines


def render(results: Results, info: dict[str, str], command: str, workers: list[int]) -> str:
    lines = [
        "# NTONIX benchmark results",
        "",
        f"`{command}` on {info['date']}, commit {info['commit']}.",
        "",
        f"Machine: {info['cpus']}, {info['memory']} RAM, Linux {info['kernel']}; "
        f"{info['python']}; {info['libraries']}.",
        "",
        "CPU columns: percent of one core over the scenario "
        f"({os.cpu_count()} cores = {100 * (os.cpu_count() or 1)}%). *others* is the machine's "
        "busy time minus gateway (or the framework floor), mocks and load generator: the kernel's "
        "loopback work and anything else running on this shared machine; a large figure there "
        "means that run was disturbed. CPU µs/req: the server's user plus system CPU time "
        "(/proc/PID/stat) over the measurement window, per request completed in it.",
        "",
        "## Targets",
        "",
        *_targets(results, workers),
    ]
    if results.throughput:
        lines += [f"## (a) Non-streaming chat completions, {_CONNECTIONS}", ""]
        lines += _throughput(results)
    if results.burst:
        lines += ["## (b) Time to first token, bursts of 100 streams (ms)", ""]
        lines += _burst(results)
    if results.slow:
        lines += ["## (c) Slow streams at 2 tokens/s, 1,000 per gateway worker", ""]
        lines += _slow(results)
    if results.disconnects:
        lines += [
            "## (d) Client disconnects after 3 tokens: client close -> upstream closed at the mock",
            "",
            "*closed*: the upstream's close reached the mock's socket (the lean mock's FIN "
            "clock, mocks/fin_clock.py: *kernel*, the FIN or RST segment's own time, or where "
            "the mock lacks CAP_NET_RAW *thread*, milliseconds late under load; *loop*: "
            "neither had it, the noticed time); *mock noticed*: its loop saw it, which adds "
            "the mock's own reaction time.",
            "",
        ]
        lines += _disconnects(results)
    if results.clients is not None:
        lines += ["## (e) Upstream clients against the mocks, in one process", ""]
        lines += _clients(results.clients)
    if results.floor:
        lines += [f"## (f) Framework floor: (a)'s load at a bare Hypercorn app, {_CONNECTIONS}", ""]
        lines += _floor(results)
    if results.costs:
        lines += ["## (i) Stream costs next to the framework floor", ""]
        lines += _costs(results)
    cache = cache_results(results)
    if cache:
        lines += ["## (g) Response cache: a Zipf workload, cache off vs on", ""]
        lines += _cache(cache)
    if results.profiles:
        lines += ["## Profile of the gateway", ""]
        lines += _profiles(results.profiles)
    return "\n".join(lines)
