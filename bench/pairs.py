"""`python -m bench.pairs OLD_SRC NEW_SRC [--load requests|burst] [--pairs 6] [--seconds 5]`:
the gateway's CPU from two source trees, side by side, in alternating pairs.

Each tree's `src` directory runs as `ntonix serve --workers 1` (the tree first on PYTHONPATH)
behind the same two backends; the load goes to one gateway, then the other, the order
alternating from pair to pair. Two loads:
- requests (the default): scenario (a)'s load (64 keep-alive connections) at two lean mocks; a
  gateway's CPU (utime + stime from /proc) over the measurement window, divided by the
  requests it completed in it, is its figure for that run;
- burst: scenario (i)'s open load (1,000 streams at once, 1 token each, the first after 0.5
  s) at two `bench.backend`s, as (i) runs it; a gateway's CPU seconds for the whole burst, and
  the burst's TTFT p99, are its figures for that run;
- burst100: scenario (b)'s burst (100 streams at once, 20 tokens, the first after 50 ms) at
  the same backends; its TTFT p50 and p99, and the gateway's CPU seconds.
Prints every run, then each pair's new / old and their median; the processes' logs go to
bench/results/logs-pairs/, as the other benches' do.

Why pairs: on a shared machine the same tree's figure moves by 10-25% from one minute to the
next; a ratio taken seconds apart, with the order alternating, cancels most of that.
An old tree is made with `git archive COMMIT src | tar -x -C DIR`.

Invariant: both gateways run the same config, mocks and load; only the source differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.costs import OPEN_HEADERS, WARM_HEADERS
from bench.drive import run_requests, run_streams
from bench.load import LoadSpec
from bench.procs import (
    CpuMeter,
    Gateway,
    Processes,
    cpu_seconds,
    gateway_config,
    start_backend,
    start_gateway,
    start_mock,
)
from bench.scenarios import BURST_HEADERS, CHAT_BODY, STREAM_BODY, Sizes
from bench.stats import median, percentile

MOCK_OPTIONS = ["--tokens", "8", "--token-delay", "0", "--ttft", "0"]
CONNECTIONS = 64
WARMUP = 1.0


def cpu_per_request(processes: Processes, gateway: Gateway, seconds: float, label: str) -> float:
    """(a)'s load at `gateway` for `seconds` after a warm-up; its CPU µs per request."""
    spec = LoadSpec(
        mode="requests",
        targets=[("127.0.0.1", gateway.port)],
        connections=CONNECTIONS,
        body=CHAT_BODY,
        start_at=0.0,
        warmup=WARMUP,
        duration=seconds,
        id_prefix=label,
    )
    pid = gateway.process.pid
    marks: dict[str, float] = {}

    def on_start() -> None:
        marks["start"] = time.monotonic()

    def tick() -> None:
        elapsed = time.monotonic() - marks.get("start", time.monotonic())
        if "cpu0" not in marks and elapsed >= WARMUP:
            marks["cpu0"], marks["at0"] = cpu_seconds(pid), time.monotonic()
        elif "cpu0" in marks and "cpu1" not in marks and elapsed >= WARMUP + seconds:
            marks["cpu1"], marks["at1"] = cpu_seconds(pid), time.monotonic()

    load = run_requests(processes, spec, 1, on_start=on_start, every=tick)
    if load.errors or not load.completed:
        raise RuntimeError(f"{label}: {load.errors} errors, {load.completed} completed")
    # CPU per second over requests per second: the two windows may differ by a poll tick.
    cpu_rate = (marks["cpu1"] - marks["cpu0"]) / (marks["at1"] - marks["at0"])
    return 1e6 * cpu_rate / (load.completed / seconds)


def burst(processes: Processes, gateway: Gateway, label: str, load: str) -> list[float]:
    """A burst of `load` ("burst": (i)'s, "warm": it without its wait, "burst100": (b)'s) at
    `gateway`: [its CPU seconds, TTFT p99 ms], and for burst100 TTFT p50 ms first."""
    sizes = Sizes()
    count, headers = sizes.cost_open_streams, OPEN_HEADERS
    if load == "warm":
        headers = WARM_HEADERS
    elif load == "burst100":
        count, headers = sizes.burst, BURST_HEADERS
    spec = LoadSpec(
        mode="streams",
        targets=[("127.0.0.1", gateway.port)],
        connections=count,
        body=STREAM_BODY,
        start_at=0.0,
        headers=headers,
        timeout=90.0,
        id_prefix=f"{label}-{time.time_ns()}",
    )
    meter = CpuMeter({"gateway": gateway.pids()})
    load_processes = 1 if load == "burst100" else sizes.stream_processes
    result = run_streams(processes, spec, load_processes, on_start=meter.start)
    meter.stop()
    if result.errors:
        raise RuntimeError(f"{label}: {result.errors}")
    ttfts = [stream.ttft for stream in result.streams if stream.ttft is not None]
    p99 = [1000 * percentile(ttfts, 0.99)]
    p50 = [1000 * percentile(ttfts, 0.50)] if load == "burst100" else []
    return [*p50, *p99, meter.seconds["gateway"]]


def _gateway(processes: Processes, config: Path, source: Path) -> Gateway:
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(source)  # the child imports ntonix from this tree
    try:
        return start_gateway(processes, config, workers=1)
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pairs", description=__doc__)
    parser.add_argument("old", type=Path, help="the old tree's src directory")
    parser.add_argument("new", type=Path, help="the new tree's src directory")
    parser.add_argument("--load", choices=("requests", "burst", "burst100"), default="requests")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0, help="of load per run (requests)")
    args = parser.parse_args(argv)
    log_dir = Path(__file__).resolve().parent / "results" / "logs-pairs"
    log_dir.mkdir(parents=True, exist_ok=True)
    bursts = args.load != "requests"
    names = {
        "requests": ["µs/request"],
        "burst": ["TTFT p99 ms", "CPU s"],
        "burst100": ["TTFT p50 ms", "TTFT p99 ms", "CPU s"],
    }[args.load]
    with Processes(log_dir) as processes:
        if bursts:
            backends = [start_backend(processes, f"backend-{n}", MOCK_OPTIONS) for n in range(2)]
        else:
            backends = [start_mock(processes, f"mock-{n}", MOCK_OPTIONS) for n in range(2)]
        config = log_dir / "gateway.toml"
        config.write_text(gateway_config(backends))
        gateways = [_gateway(processes, config, tree.resolve()) for tree in (args.old, args.new)]

        def run(side: int, label: str, warm: bool = False) -> list[float]:
            if bursts:
                return burst(processes, gateways[side], label, "warm" if warm else args.load)
            seconds = 2.0 if warm else args.seconds
            return [cpu_per_request(processes, gateways[side], seconds, label)]

        for side in (0, 1):  # warm both up alike
            run(side, f"warm-{side}", warm=True)
        figures: list[list[list[float]]] = [[], []]
        for pair in range(args.pairs):
            for side in (0, 1) if pair % 2 == 0 else (1, 0):
                figures[side].append(run(side, f"p{pair}-{side}"))
                values = zip(figures[side][-1], names, strict=True)
                shown = ", ".join(f"{value:.3g} {name}" for value, name in values)
                print(f"pair {pair} {('old', 'new')[side]}: {shown}", flush=True)
    for index, name in enumerate(names):
        ratios = sorted(new[index] / old[index] for old, new in zip(*figures, strict=True))
        lower = sum(ratio < 1 for ratio in ratios)
        print(f"{name}, new / old per pair: {' '.join(f'{r:.3f}' for r in ratios)}")
        print(f"{name}: median {median(ratios):.3f}; new lower in {lower} of {len(ratios)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
