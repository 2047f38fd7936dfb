"""`python -m bench.pairs OLD_SRC NEW_SRC [--pairs 6] [--seconds 5]`: the gateway's CPU per
non-streaming request from two source trees, side by side, in alternating pairs.

Each tree's `src` directory runs as `ntonix serve --workers 1` (the tree first on PYTHONPATH)
behind the same two lean mocks; scenario (a)'s load (64 keep-alive connections) goes to one
gateway, then the other, the order alternating from pair to pair. A gateway's CPU (utime +
stime from /proc) over the measurement window, divided by the requests it completed in it, is
its figure for that run. Prints every run, then each pair's new / old and their median; the
processes' logs go to bench/results/logs-pairs/, as the other benches' do.

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

from bench.drive import run_requests
from bench.load import LoadSpec
from bench.procs import (
    Gateway,
    Processes,
    cpu_seconds,
    gateway_config,
    start_gateway,
    start_mock,
)
from bench.scenarios import CHAT_BODY
from bench.stats import median

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
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0, help="of load per run")
    args = parser.parse_args(argv)
    log_dir = Path(__file__).resolve().parent / "results" / "logs-pairs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with Processes(log_dir) as processes:
        mocks = [start_mock(processes, f"mock-{n}", MOCK_OPTIONS) for n in range(2)]
        config = log_dir / "gateway.toml"
        config.write_text(gateway_config(mocks))
        gateways = [_gateway(processes, config, tree.resolve()) for tree in (args.old, args.new)]
        for index, gateway in enumerate(gateways):  # warm both up alike
            cpu_per_request(processes, gateway, 2.0, f"warm-{index}")
        figures: list[list[float]] = [[], []]
        for pair in range(args.pairs):
            for side in (0, 1) if pair % 2 == 0 else (1, 0):
                us = cpu_per_request(processes, gateways[side], args.seconds, f"p{pair}-{side}")
                figures[side].append(us)
                print(f"pair {pair} {('old', 'new')[side]}: {us:.0f} µs/request", flush=True)
    ratios = sorted(new / old for old, new in zip(*figures, strict=True))
    lower = sum(ratio < 1 for ratio in ratios)
    print(f"new / old per pair: {' '.join(f'{r:.3f}' for r in ratios)}")
    print(f"median {median(ratios):.3f}; new lower in {lower} of {len(ratios)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
