"""Scenario (i): what a stream and a relayed token cost the gateway, next to the framework floor.

The same loads run at the floor (`bench.floor`, as many processes as the gateway has workers,
sharing one socket) and through the gateway, alternating, and each row reads the ratio of the
two from the same repeat:
- open: 1,000 streams at once, 1 token each, the first after 0.5 s: the CPU the server used
  from the first connect to the last byte, and TTFT p99;
- relay: 500 streams at 10 tokens/s (21 tokens, 0.1 s apart, so no two arrive together), minus
  the same 500 streams with 1 token: CPU per relayed token;
- many (2 workers or more): 5,000 streams at 2 tokens/s (20 tokens, 0.5 s apart): errors and
  TTFT p99.

The floor has no backend; the gateway needs two, and on a 2-core machine their CPU is taken
from the gateway's. So (i) runs a gateway of its own (as many workers as the scenarios' one) in
front of two `bench.backend` processes: the mock's replies, the same bytes at the same times,
for about a tenth of the lean mock's CPU (docs/BENCHMARKS.md, "Two workers on two cores"). Both
servers first serve one unmeasured open load, so that each starts warm (imports, first
allocations, and for the gateway the kept-alive upstream connections a running gateway holds).

Invariants: every ratio divides figures of one repeat (floor and gateway seconds apart, the
order alternating); CPU is the server's own (utime + stime from /proc, all its processes), never
wall time; the backends' CPU is not the gateway's (it is shown beside it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.procs import (
    CpuMeter,
    Gateway,
    Mock,
    descendants,
    start_floor,
)
from bench.scenarios import Address, Bench, StreamRun, _streams, fast_backends
from bench.stats import median

OPEN_HEADERS = {"x-mock-ttft": "0.5", "x-mock-tokens": "1", "x-mock-token-delay": "0"}
RELAY_TOKENS = 21
RELAY_HEADERS = {"x-mock-ttft": "0.1", "x-mock-token-delay": "0.1"}
# The warm-up: the open load without its wait.
WARM_HEADERS = {"x-mock-ttft": "0", "x-mock-tokens": "1", "x-mock-token-delay": "0"}
MANY_HEADERS = {"x-mock-ttft": "0.5", "x-mock-tokens": "20", "x-mock-token-delay": "0.5"}


@dataclass
class Costed:
    """One run: what the clients saw, and the server's CPU seconds meanwhile."""

    run: StreamRun
    cpu_s: float
    backends_cpu_s: float = 0.0  # the backends' (none at the floor)


@dataclass
class CostPair:
    floor: Costed
    gateway: Costed


@dataclass
class CostsResult:
    floor_processes: int
    relay_streams: int
    open: list[CostPair] = field(default_factory=list)
    relay_one: list[CostPair] = field(default_factory=list)  # 500 streams x 1 token
    relay_many: list[CostPair] = field(default_factory=list)  # 500 streams x 21 tokens
    many: list[CostPair] = field(default_factory=list)

    def _ratio(self, pairs: list[CostPair], figure: str) -> float:
        def value(costed: Costed) -> float:
            return costed.cpu_s if figure == "cpu" else costed.run.ttft_p99_ms

        return median([value(p.gateway) / value(p.floor) for p in pairs if value(p.floor)])

    @property
    def open_cpu_ratio(self) -> float:
        return self._ratio(self.open, "cpu")

    @property
    def open_ttft_ratio(self) -> float:
        return self._ratio(self.open, "ttft")

    @property
    def many_ttft_ratio(self) -> float:
        return self._ratio(self.many, "ttft")

    def token_us(self, side: str) -> list[float]:
        """CPU microseconds per relayed token, per repeat, at `side` ("floor" or "gateway")."""
        tokens = self.relay_streams * (RELAY_TOKENS - 1)
        return [
            1e6 * (getattr(many, side).cpu_s - getattr(one, side).cpu_s) / tokens
            for one, many in zip(self.relay_one, self.relay_many, strict=True)
        ]

    @property
    def token_ratio(self) -> float:
        pairs = zip(self.token_us("gateway"), self.token_us("floor"), strict=True)
        return median([gateway / floor for gateway, floor in pairs if floor > 0])


def stream_costs(bench: Bench) -> CostsResult:
    """(i) at a gateway of `bench.gateway`'s worker count in front of `bench.backend`s, against
    a floor of as many processes."""
    floor = start_floor(bench.processes, count=bench.gateway.workers)
    try:
        with fast_backends(bench, "i") as (gateway, backends):
            return _measure(bench, gateway, backends, bench.at_floor(floor), floor.process.pid)
    finally:
        bench.processes.stop(floor.process)


def _measure(
    bench: Bench, gateway: Gateway, backends: list[Mock], at_floor: list[Address], floor_pid: int
) -> CostsResult:
    sizes = bench.sizes
    floor_pids = [floor_pid, *descendants(floor_pid)]
    through_gateway: list[Address] = [("127.0.0.1", gateway.port)]
    result = CostsResult(floor_processes=gateway.workers, relay_streams=sizes.cost_relay_streams)

    def run(label: str, count: int, headers: dict[str, str], side: str) -> Costed:
        if side == "floor":
            targets, pids = at_floor, floor_pids
        else:
            targets, pids = through_gateway, gateway.pids()
        meter = CpuMeter({"server": pids, "mocks": [backend.pid for backend in backends]})
        streams, _ = _streams(
            bench,
            targets,
            f"i-{label}-{side}",
            count=count,
            headers=headers,
            processes=sizes.stream_processes,
            timeout=90.0,
            meter=meter,
        )
        return Costed(streams, meter.seconds["server"], meter.seconds["mocks"])

    def pair(label: str, count: int, headers: dict[str, str], repeat: int) -> CostPair:
        order = ["floor", "gateway"] if repeat % 2 == 0 else ["gateway", "floor"]
        runs = {side: run(f"{label}{repeat}", count, headers, side) for side in order}
        return CostPair(runs["floor"], runs["gateway"])

    open_streams = sizes.cost_open_streams
    for side in ("floor", "gateway"):
        run("warm", open_streams, WARM_HEADERS, side)
    relay_streams = result.relay_streams
    for repeat in range(sizes.cost_repeats):
        result.open.append(pair("open", open_streams, OPEN_HEADERS, repeat))
        one = {**RELAY_HEADERS, "x-mock-tokens": "1"}
        result.relay_one.append(pair("relay1", relay_streams, one, repeat))
        many = {**RELAY_HEADERS, "x-mock-tokens": str(RELAY_TOKENS)}
        result.relay_many.append(pair("relay", relay_streams, many, repeat))
    if gateway.workers >= 2:
        result.many.append(pair("many", sizes.cost_many_streams, MANY_HEADERS, 0))
    return result
