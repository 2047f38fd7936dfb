"""Scenarios (a) to (d): each runs the same load straight at the mocks and through the gateway;
(f) runs (a)'s load at the framework floor (a minimal app on the gateway's Hypercorn setup),
and (b) and (c) run their streams at the floor too, so that each shows what Hypercorn and Trio
alone cost next to what the gateway costs.

Invariants: a scenario leaves no stream open behind it (the load processes have exited), every
figure comes with the CPU that gateway, mocks and load generator used meanwhile (percent of one
core), so the report shows who was saturated, and nothing here tunes a number toward a target.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.drive import StreamsLoad, run_requests, run_streams
from bench.load import LoadSpec
from bench.procs import (
    MOCK_OPTIONS,
    CpuMeter,
    Floor,
    Gateway,
    Mock,
    Processes,
    gateway_config,
    memory_kib,
    start_backend,
    start_floor,
    start_gateway,
)
from bench.stats import median, percentile

CHAT = {"model": "mock-llm", "messages": [{"role": "user", "content": "Tell me a story"}]}
CHAT_BODY = json.dumps(CHAT)
STREAM_BODY = json.dumps({**CHAT, "stream": True})
Address = tuple[str, int]  # (host, port)


@dataclass(frozen=True)
class Sizes:
    """How much load each scenario applies; `QUICK` is for a smoke run of about a minute."""

    connections: int = 64  # (a) keep-alive connections
    warmup: float = 1.0  # (a) seconds before the window opens
    duration: float = 5.0  # (a) measurement window
    throughput_repeats: int = 3  # (a) direct/gateway pairs; the median is reported
    request_processes: int = 2  # (a) load processes
    burst: int = 100  # (b) concurrent streams
    burst_repeats: int = 5  # (b) direct/floor/gateway rounds; median differences are reported
    slow_streams_per_worker: int = 1000  # (c)
    slow_tokens: int = 20  # (c) at 0.5 s each: 2 tokens/s
    stream_processes: int = 2  # (c) load processes
    disconnects: int = 200  # (d) streams per run
    disconnect_repeats: int = 3  # (d) direct/gateway pairs, pooled
    client_seconds: float = 5.0  # (e) per client
    storm_rounds: int = 3  # (e) cancellation storms before the leak check
    cost_open_streams: int = 1000  # (i) streams opened at once, 1 token each
    cost_relay_streams: int = 500  # (i) streams at 10 tokens/s
    cost_many_streams: int = 5000  # (i) streams at 2 tokens/s, with 2 workers or more
    cost_repeats: int = 3  # (i) floor/gateway pairs of the open and relay loads


QUICK = Sizes(
    warmup=0.5,
    duration=3.0,
    throughput_repeats=1,
    burst_repeats=1,
    slow_streams_per_worker=200,
    slow_tokens=6,
    disconnects=50,
    disconnect_repeats=1,
    client_seconds=2.0,
    storm_rounds=1,
    cost_open_streams=200,
    cost_relay_streams=100,
    cost_many_streams=1000,
    cost_repeats=1,
)


@dataclass
class Bench:
    """What the scenarios run against: the mocks, and the gateway in front of them."""

    processes: Processes
    mocks: list[Mock]
    sizes: Sizes
    gateway: Gateway

    def direct(self) -> list[Address]:
        return [(mock.host, mock.port) for mock in self.mocks]

    def through_gateway(self) -> list[Address]:
        return [("127.0.0.1", self.gateway.port)]

    def at_floor(self, floor: Floor) -> list[Address]:
        return [("127.0.0.1", floor.port)]

    def meter(self) -> CpuMeter:
        return CpuMeter({"gateway": self.gateway.pids(), "mocks": [m.pid for m in self.mocks]})

    def floor_meter(self, floor: Floor) -> CpuMeter:
        # The mocks stay in the meter: idle here, they show that nothing else was relayed.
        return CpuMeter({"floor": [floor.process.pid], "mocks": [m.pid for m in self.mocks]})

    def reset_mocks(self) -> None:
        for mock in self.mocks:
            mock.reset()

    def mock_stats(self) -> list[dict[str, Any]]:
        """Each mock's `GET /mock/stats` (JSON: requests, active, disconnects, ...)."""
        return [mock.stats() for mock in self.mocks]

    def mocks_active(self) -> int:
        return sum(int(stats["active"]) for stats in self.mock_stats())


class _Window:
    """Starts and stops a CpuMeter at fixed offsets from the load's start, from the load
    runner's poll loop, so that CPU covers the measurement window and not the warm-up."""

    def __init__(self, meter: CpuMeter, opens: float, closes: float) -> None:
        self._meter = meter
        self._opens = opens
        self._closes = closes
        self._started_at = 0.0
        self._state = "waiting"

    def on_start(self) -> None:
        self._started_at = time.monotonic()

    def tick(self) -> None:
        elapsed = time.monotonic() - self._started_at
        if self._state == "waiting" and elapsed >= self._opens:
            self._meter.start()
            self._state = "open"
        elif self._state == "open" and elapsed >= self._closes:
            self.close()

    def close(self) -> None:
        if self._state == "open":
            self._meter.stop()
        self._state = "closed"


def _cpu_percent(meter: CpuMeter, load_cpu: float, load_wall: float) -> dict[str, float]:
    wall = meter.wall or 1.0
    percent = {name: 100 * seconds / wall for name, seconds in meter.seconds.items()}
    percent["load"] = 100 * load_cpu / (load_wall or 1.0)
    return percent


# --- (a) non-streaming throughput --------------------------------------------------------------


@dataclass
class Throughput:
    rate: float  # completed requests per second
    p50_ms: float
    p99_ms: float
    errors: int
    cpu: dict[str, float]
    error_samples: list[str] = field(default_factory=list)

    def cpu_us(self, role: str) -> float:
        """CPU microseconds per completed request of one role's processes over the window.

        CPU per second over rate rather than CPU seconds over completed requests: the meter's
        window and the load's can differ by a poll tick, and this way neither length matters.
        """
        if not self.rate or role not in self.cpu:
            return math.nan
        return 1e4 * self.cpu[role] / self.rate  # percent of a core -> seconds: / 100


def measure_throughput(
    bench: Bench, targets: list[Address], label: str, meter: CpuMeter | None = None
) -> Throughput:
    """(a)'s load at `targets`; `meter` (default: gateway and mocks) is read over the window."""
    sizes = bench.sizes
    spec = LoadSpec(
        mode="requests",
        targets=targets,
        connections=sizes.connections,
        body=CHAT_BODY,
        start_at=0.0,
        warmup=sizes.warmup,
        duration=sizes.duration,
        id_prefix=f"a-{label}",
    )
    meter = meter or bench.meter()
    window = _Window(meter, sizes.warmup, sizes.warmup + sizes.duration)
    load = run_requests(
        bench.processes, spec, sizes.request_processes, on_start=window.on_start, every=window.tick
    )
    window.close()
    return Throughput(
        rate=load.rate,
        p50_ms=1000 * percentile(load.latencies, 0.50),
        p99_ms=1000 * percentile(load.latencies, 0.99),
        errors=load.errors,
        cpu=_cpu_percent(meter, load.cpu, load.window),
        error_samples=load.error_samples,
    )


@dataclass
class ThroughputResult:
    pairs: list[tuple[Throughput, Throughput]]  # (direct, gateway), one per repeat

    @property
    def gateway_rate(self) -> float:
        return median([gateway.rate for _, gateway in self.pairs])

    @property
    def gateway_us(self) -> float:
        """Median over the repeats of the gateway's CPU microseconds per request."""
        return median([gateway.cpu_us("gateway") for _, gateway in self.pairs])

    @property
    def ratio(self) -> float:
        """Median over the repeats of gateway rate / direct rate."""
        return median([g.rate / d.rate if d.rate else math.nan for d, g in self.pairs])


def throughput(bench: Bench) -> ThroughputResult:
    """(a) Requests per second at 64 keep-alive connections, small answers, no delays; direct
    and gateway alternate, so that a neighbour's burst of CPU hits both alike."""
    pairs = []
    for repeat in range(bench.sizes.throughput_repeats):
        direct = measure_throughput(bench, bench.direct(), f"a{repeat}-direct")
        gateway = measure_throughput(bench, bench.through_gateway(), f"a{repeat}-gateway")
        pairs.append((direct, gateway))
    return ThroughputResult(pairs)


# --- (f) the framework floor ----------------------------------------------------------------


@dataclass
class FloorResult:
    """(f): the floor's runs have its CPU under "floor", the gateway's under "gateway"."""

    pairs: list[tuple[Throughput, Throughput]]  # (floor, gateway), one per repeat

    @property
    def floor_rate(self) -> float:
        return median([floor.rate for floor, _ in self.pairs])

    @property
    def gateway_rate(self) -> float:
        return median([gateway.rate for _, gateway in self.pairs])

    @property
    def floor_us(self) -> float:
        return median([floor.cpu_us("floor") for floor, _ in self.pairs])

    @property
    def gateway_us(self) -> float:
        return median([gateway.cpu_us("gateway") for _, gateway in self.pairs])

    @property
    def own_us(self) -> float:
        """Median over the pairs of gateway minus floor CPU per request: the gateway's share."""
        return median([g.cpu_us("gateway") - f.cpu_us("floor") for f, g in self.pairs])


def framework_floor(bench: Bench) -> FloorResult:
    """(f) (a)'s load at a minimal ASGI app served like the gateway (`bench.floor`), alternating
    with the gateway: its CPU per request is what Hypercorn and Trio take before the gateway's
    own work, and its rate the most any app served this way gets from one process here."""
    floor = start_floor(bench.processes)
    try:
        pairs = []
        for repeat in range(bench.sizes.throughput_repeats):
            floored = measure_throughput(
                bench, bench.at_floor(floor), f"f{repeat}-floor", bench.floor_meter(floor)
            )
            gateway = measure_throughput(bench, bench.through_gateway(), f"f{repeat}-gateway")
            pairs.append((floored, gateway))
    finally:
        bench.processes.stop(floor.process)
    return FloorResult(pairs)


# --- streams, shared by (b), (c) and (d) --------------------------------------------------------


@dataclass
class StreamRun:
    total: int
    ok: int
    errors: dict[str, int]
    ttft_p50_ms: float
    ttft_p99_ms: float
    cpu: dict[str, float]
    # The part of TTFT spent in the client's connect(): a SYN dropped from a full listen queue
    # costs a second there.
    connect_p99_ms: float = math.nan


def _streams(
    bench: Bench,
    targets: list[Address],
    label: str,
    *,
    count: int,
    headers: dict[str, str],
    processes: int = 1,
    hangup_after: int = 0,
    timeout: float = 30.0,
    every: Callable[[], None] | None = None,
    meter: CpuMeter | None = None,
) -> tuple[StreamRun, StreamsLoad]:
    """`count` streams at `targets`; `meter` (default: gateway and mocks) runs meanwhile."""
    spec = LoadSpec(
        mode="streams",
        targets=targets,
        connections=count,
        body=STREAM_BODY,
        start_at=0.0,
        headers=headers,
        hangup_after=hangup_after,
        timeout=timeout,
        id_prefix=f"{label}-{time.time_ns()}",
    )
    meter = meter or bench.meter()
    load = run_streams(bench.processes, spec, processes, on_start=meter.start, every=every)
    meter.stop()
    ttfts = [s.ttft for s in load.streams if s.ttft is not None]
    connects = [s.connected for s in load.streams if s.connected is not None]
    run = StreamRun(
        total=count,
        ok=sum(1 for s in load.streams if s.ok),
        errors=load.errors,
        ttft_p50_ms=1000 * percentile(ttfts, 0.50),
        ttft_p99_ms=1000 * percentile(ttfts, 0.99),
        cpu=_cpu_percent(meter, load.cpu, load.elapsed),
        connect_p99_ms=1000 * percentile(connects, 0.99),
    )
    return run, load


# --- (b) added time to first token -------------------------------------------------------------

BURST_HEADERS = {"x-mock-ttft": "0.05", "x-mock-tokens": "20", "x-mock-token-delay": "0.02"}


@dataclass
class BurstRepeat:
    """One repeat of (b): the same burst straight at the mocks, at the floor, via the gateway."""

    direct: StreamRun
    floor: StreamRun
    gateway: StreamRun


@dataclass
class BurstResult:
    repeats: list[BurstRepeat]

    def _median(self, pick: Callable[[BurstRepeat], float]) -> float:
        return median([pick(repeat) for repeat in self.repeats])

    @property
    def added_p50_ms(self) -> float:
        """Median over the repeats of gateway minus direct TTFT p50."""
        return self._median(lambda r: r.gateway.ttft_p50_ms - r.direct.ttft_p50_ms)

    @property
    def added_p99_ms(self) -> float:
        return self._median(lambda r: r.gateway.ttft_p99_ms - r.direct.ttft_p99_ms)

    @property
    def floor_added_p50_ms(self) -> float:
        """Median over the repeats of floor minus direct TTFT p50: Hypercorn and Trio alone."""
        return self._median(lambda r: r.floor.ttft_p50_ms - r.direct.ttft_p50_ms)

    @property
    def floor_added_p99_ms(self) -> float:
        return self._median(lambda r: r.floor.ttft_p99_ms - r.direct.ttft_p99_ms)

    @property
    def own_p50_ms(self) -> float:
        """Median over the repeats of gateway minus floor TTFT p50: the gateway's own share."""
        return self._median(lambda r: r.gateway.ttft_p50_ms - r.floor.ttft_p50_ms)

    @property
    def own_p99_ms(self) -> float:
        return self._median(lambda r: r.gateway.ttft_p99_ms - r.floor.ttft_p99_ms)


@contextmanager
def fast_backends(bench: Bench, label: str) -> Iterator[tuple[Gateway, list[Mock]]]:
    """A gateway of `bench.gateway`'s worker count in front of as many `bench.backend`s as
    there are mocks, for the scenarios set against the floor ((b) and (i)): the lean mocks
    use a large share of the two cores (a stream costs them 50-65% of what it costs the
    gateway) and answer a burst late, while the floor plays its streams on its own timers;
    an engine's CPU is on another machine. Same replies, same times (docs/BENCHMARKS.md)."""
    processes = bench.processes
    backends = [
        start_backend(processes, f"backend-{label}-{index + 1}", MOCK_OPTIONS)
        for index in range(len(bench.mocks))
    ]
    started = [backend.pid for backend in backends]
    try:
        workers = bench.gateway.workers
        config = processes.log_dir / f"ntonix-{label}-w{workers}.toml"
        config.write_text(gateway_config(backends))
        gateway = start_gateway(processes, config, workers, name=f"gateway-{label}-w{workers}")
        started.append(gateway.process.pid)
        yield gateway, backends
    finally:
        for pid in reversed(started):
            processes.stop_pid(pid)


def _burst_run(bench: Bench, targets: list[Address], label: str, meter: CpuMeter) -> StreamRun:
    run, _ = _streams(
        bench, targets, label, count=bench.sizes.burst, headers=BURST_HEADERS, meter=meter
    )
    return run


def burst(bench: Bench) -> BurstResult:
    """(b) 100 streams at once: straight at the backends, at the floor (started for the
    scenario) and through the gateway, in turn per repeat, so that a neighbour's burst of CPU
    hits all three alike. Behind `fast_backends`, as (i); each side first serves one unmeasured
    burst (a fresh gateway opens its upstream connections then)."""
    floor = start_floor(bench.processes)
    try:
        with fast_backends(bench, "b") as (gateway, backends):
            direct = [(backend.host, backend.port) for backend in backends]
            through = [("127.0.0.1", gateway.port)]
            at_floor = bench.at_floor(floor)
            backend_pids = [backend.pid for backend in backends]

            def run(label: str, targets: list[Address]) -> StreamRun:
                # The direct run's meter holds the idle gateway, as the report expects.
                server = {"floor": [floor.process.pid]} if targets is at_floor else {}
                groups = server or {"gateway": gateway.pids()}
                meter = CpuMeter({**groups, "mocks": backend_pids})
                return _burst_run(bench, targets, label, meter)

            run("b-warm-gateway", through)
            run("b-warm-floor", at_floor)
            repeats = []
            for repeat in range(bench.sizes.burst_repeats):
                repeats.append(
                    BurstRepeat(
                        run(f"b{repeat}-direct", direct),
                        run(f"b{repeat}-floor", at_floor),
                        run(f"b{repeat}-gateway", through),
                    )
                )
    finally:
        bench.processes.stop(floor.process)
    return BurstResult(repeats)


# --- (c) many slow streams, and the gateway's memory per stream ------------------------------


@dataclass
class SlowStreamsResult:
    streams: int
    direct: StreamRun
    gateway: StreamRun
    floor: StreamRun  # the floor is one process: one worker's streams, whatever the count
    idle_rss_kib: int  # the gateway's processes together, warmed up, no streams
    open_rss_kib: int  # the largest sample while every stream was open at the mocks
    all_open_seen: bool  # False: no sample saw every stream open; open_rss_kib is the largest
    peak_rss_kib: int  # VmHWM summed over the gateway's processes, after the run
    worker_peak_kib: int  # the largest VmHWM of one worker

    @property
    def per_stream_kib(self) -> float:
        return (self.open_rss_kib - self.idle_rss_kib) / self.streams


def _gateway_rss(gateway: Gateway) -> int:
    return sum(memory_kib(pid)["VmRSS"] for pid in gateway.pids())


# Lazily imported modules and first allocations must count neither as per-stream memory nor
# against the first streams' TTFT.
SLOW_WARM_UP = {"x-mock-ttft": "0", "x-mock-tokens": "3", "x-mock-token-delay": "0"}


def _slow_run(
    bench: Bench,
    targets: list[Address],
    label: str,
    count: int,
    *,
    meter: CpuMeter | None = None,
    every: Callable[[], None] | None = None,
) -> StreamRun:
    """`count` streams of `slow_tokens` tokens at 2 tokens/s, opened at once."""
    tokens = bench.sizes.slow_tokens
    headers = {"x-mock-ttft": "0.05", "x-mock-tokens": str(tokens), "x-mock-token-delay": "0.5"}
    run, _ = _streams(
        bench,
        targets,
        label,
        count=count,
        headers=headers,
        processes=bench.sizes.stream_processes,
        timeout=0.5 * tokens + 30,
        every=every,
        meter=meter,
    )
    return run


def slow_streams(bench: Bench) -> SlowStreamsResult:
    """(c) 1,000 streams per worker at 2 tokens/s; run first, on a fresh gateway, so that the
    idle memory is a clean baseline. Then one worker's share of them at the floor (started for
    the scenario), then the gateway's count straight at the mocks."""
    sizes = bench.sizes
    count = sizes.slow_streams_per_worker * bench.gateway.workers
    _streams(bench, bench.through_gateway(), "c-warm", count=20, headers=SLOW_WARM_UP)
    time.sleep(0.5)
    idle = _gateway_rss(bench.gateway)

    samples: list[tuple[int, int]] = []  # (gateway RSS, streams open at the mocks)

    def sample() -> None:
        samples.append((_gateway_rss(bench.gateway), bench.mocks_active()))

    gateway = _slow_run(bench, bench.through_gateway(), "c-gateway", count, every=sample)
    full = [rss for rss, active in samples if active >= count]
    pids = bench.gateway.worker_pids() if bench.gateway.workers > 1 else bench.gateway.pids()
    peaks = [memory_kib(pid)["VmHWM"] for pid in pids]
    floor = start_floor(bench.processes)
    try:
        at_floor = bench.at_floor(floor)
        _streams(bench, at_floor, "c-floor-warm", count=20, headers=SLOW_WARM_UP)
        floored = _slow_run(
            bench,
            at_floor,
            "c-floor",
            sizes.slow_streams_per_worker,
            meter=bench.floor_meter(floor),
        )
    finally:
        bench.processes.stop(floor.process)
    direct = _slow_run(bench, bench.direct(), "c-direct", count)
    return SlowStreamsResult(
        streams=count,
        direct=direct,
        gateway=gateway,
        floor=floored,
        idle_rss_kib=idle,
        open_rss_kib=max(full or [rss for rss, _ in samples] or [idle]),
        all_open_seen=bool(full),
        peak_rss_kib=sum(memory_kib(pid)["VmHWM"] for pid in bench.gateway.pids()),
        worker_peak_kib=max(peaks or [0]),
    )


# --- (d) client disconnects --------------------------------------------------------------------

# The first token comes 0.5 s after the request, once every stream of the burst is set up: the
# burst's own cost is (b)'s subject, (d) measures how soon a hang-up reaches the backend while
# the other streams keep flowing at 50 tokens/s.
DISCONNECT_HEADERS = {"x-mock-ttft": "0.5", "x-mock-tokens": "50", "x-mock-token-delay": "0.02"}
HANG_UP_AFTER = 3  # tokens
SETTLE = 0.5  # seconds for the last closes to reach the mocks before counting what is open


@dataclass
class DisconnectRun:
    streams: int
    hung_up: int  # clients that closed after 3 tokens as planned
    noticed: int  # of those, how many the mocks saw close (matched by x-request-id)
    # Per noticed stream: client close -> its upstream's close reached the mock's socket (the
    # lean mock's FIN clock, mocks/fin_clock.py), and -> the mock's loop noticed it (that plus
    # the mock's own reaction time, which is not the gateway's).
    closed_ms: list[float]
    delays_ms: list[float]
    left_open: int  # mock `active` after the settle time; must be 0
    cpu: dict[str, float]
    # How many of `closed_ms` each clock took (mocks/fin_clock.py): "kernel" (the segment's
    # own time), "thread" (late by the thread's wait for a core and the GIL), "loop" (neither
    # had it when the mock noticed: the noticed time).
    clocks: dict[str, int]

    @property
    def p50_ms(self) -> float:
        return percentile(self.closed_ms, 0.50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.closed_ms, 0.99)

    @property
    def max_ms(self) -> float:
        return max(self.closed_ms, default=math.nan)

    @property
    def noticed_p50_ms(self) -> float:
        return percentile(self.delays_ms, 0.50)

    @property
    def noticed_p99_ms(self) -> float:
        return percentile(self.delays_ms, 0.99)

    @classmethod
    def pooled(cls, runs: list[DisconnectRun]) -> DisconnectRun:
        """The runs' samples together: one p99 over all of them is steadier than any one."""
        roles = {role for run in runs for role in run.cpu}
        return cls(
            streams=sum(run.streams for run in runs),
            hung_up=sum(run.hung_up for run in runs),
            noticed=sum(run.noticed for run in runs),
            closed_ms=[delay for run in runs for delay in run.closed_ms],
            delays_ms=[delay for run in runs for delay in run.delays_ms],
            left_open=max(run.left_open for run in runs),
            cpu={role: sum(run.cpu.get(role, 0.0) for run in runs) / len(runs) for role in roles},
            clocks=dict(sum((Counter(run.clocks) for run in runs), Counter())),
        )


@dataclass
class DisconnectResult:
    pairs: list[tuple[DisconnectRun, DisconnectRun]]  # (direct, gateway), one per repeat

    @property
    def direct(self) -> DisconnectRun:
        return DisconnectRun.pooled([direct for direct, _ in self.pairs])

    @property
    def gateway(self) -> DisconnectRun:
        return DisconnectRun.pooled([gateway for _, gateway in self.pairs])


def _disconnects(bench: Bench, targets: list[Address], label: str) -> DisconnectRun:
    bench.reset_mocks()
    run, load = _streams(
        bench,
        targets,
        f"d-{label}",
        count=bench.sizes.disconnects,
        headers=DISCONNECT_HEADERS,
        hangup_after=HANG_UP_AFTER,
    )
    time.sleep(SETTLE)
    stats = bench.mock_stats()
    seen = {d["request_id"]: d for s in stats for d in s["disconnects"]}
    hung_up = [
        (s.closed_at, seen[s.request_id])
        for s in load.streams
        if s.closed_at is not None and s.request_id in seen
    ]
    return DisconnectRun(
        streams=run.total,
        hung_up=sum(1 for s in load.streams if s.closed_at is not None),
        noticed=len(hung_up),
        closed_ms=[1000 * (mock["closed_at"] - closed_at) for closed_at, mock in hung_up],
        delays_ms=[1000 * (mock["at"] - closed_at) for closed_at, mock in hung_up],
        left_open=sum(int(s["active"]) for s in stats),
        cpu=run.cpu,
        clocks=dict(Counter(mock.get("clock", "loop") for _, mock in hung_up)),
    )


def disconnects(bench: Bench) -> DisconnectResult:
    """(d) Clients hang up after 3 tokens: how soon does the upstream close reach the mock (and
    how soon does the mock's loop notice)?

    Direct and gateway alternate; a burst of hang-ups is sensitive to what else the machine does
    at that moment, so several repeats are pooled."""
    pairs = []
    for repeat in range(bench.sizes.disconnect_repeats):
        direct = _disconnects(bench, bench.direct(), f"{repeat}-direct")
        gateway = _disconnects(bench, bench.through_gateway(), f"{repeat}-gateway")
        pairs.append((direct, gateway))
    return DisconnectResult(pairs)
