"""`python -m bench [--quick] [--only a,b,c,d,e,f,g,h,i] [--workers 1,2] [--profile]`, or
`python -m bench --soak [MINUTES]`

Starts lean mocks, then for each worker count a fresh gateway in front of them, runs the
scenarios (each straight at the mocks and through the gateway, alternating; (b) and (c) at the
framework floor too, (f) at the floor instead of the mocks, and (i), stream costs, next to a floor
of as many processes as workers), then (g), the response cache, on gateways of its own (cache
off, then on), then (h), heterogeneous backends under each balancing strategy, on mocks and
gateways of its own, and prints the Markdown report, also written to bench/results/latest.md
(plus latest.json, and latest-hetero.json for (h)).
Progress goes to stderr. Every subprocess is stopped on the way out, whether the run ends,
fails or is interrupted. `--soak` runs the soak instead (bench/soak.py): 30 minutes unless
told, exit code 1 when it fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import trio

from bench import profile, soak_report
from bench import soak as soak_run
from bench.cache_bench import ResultsWithCache, cache_scenario
from bench.clients import ClientSpec, ClientsResult
from bench.costs import stream_costs
from bench.hetero import QUICK_HETERO, HeteroResult, HeteroSpec, hetero_scenario, render_hetero
from bench.load import raise_open_file_limit
from bench.procs import (
    MOCK_OPTIONS,
    CpuMeter,
    Mock,
    Processes,
    gateway_config,
    python_argv,
    start_gateway,
    start_mock,
)
from bench.report import render
from bench.results import ClientsRun, Results, machine
from bench.scenarios import (
    QUICK,
    Bench,
    Sizes,
    burst,
    disconnects,
    framework_floor,
    measure_throughput,
    slow_streams,
    throughput,
)

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("a", "b", "c", "d", "e", "f", "g", "h", "i")
# Those that run against the shared gateway (e measures upstream clients on their own; g and h
# start gateways of their own: g one with the cache off and one with it on, h one per strategy).
GATEWAY_SCENARIOS = {"a", "b", "c", "d", "f", "i"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--quick", action="store_true", help="smaller counts: a ~1 minute smoke run"
    )
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help="scenarios to run (a,b,c,d,e,f,g,h,i)"
    )
    parser.add_argument("--workers", default="1,2", help="gateway worker counts (1,2)")
    parser.add_argument("--mocks", type=int, default=2, help="lean mock processes (2)")
    parser.add_argument(
        "--profile", action="store_true", help="also sample the gateway with py-spy under (a)"
    )
    parser.add_argument(
        "--soak",
        type=_soak_minutes,
        nargs="?",
        const=30.0,
        metavar="MINUTES",
        help="run the soak instead (30 minutes unless given; needs the `bench` extra)",
    )
    return parser


def _soak_minutes(text: str) -> float:
    """A soak judges its samples after the warm-up: a run without a minute of them (12
    samples) could only fail, so it is refused before anything starts."""
    minutes = float(text)
    shortest = (soak_run.WARMUP + soak_run.MIN_SAMPLES * soak_run.SAMPLE_EVERY) / 60
    if not minutes >= shortest:
        raise argparse.ArgumentTypeError(
            f"a soak needs at least {shortest:g} minutes ({soak_run.WARMUP / 60:g} of warm-up, "
            f"then a minute of samples to fit), got {text}"
        )
    return minutes


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the `finally` blocks stop every child.
    raise KeyboardInterrupt


def _run_gateway_scenarios(
    bench: Bench, only: set[str], results: Results, profile_it: bool
) -> None:
    workers = bench.gateway.workers
    # (c) first: its idle-memory baseline needs a gateway that has served little so far.
    if "c" in only:
        _log(f"(c) slow streams, {workers} worker(s)")
        results.slow[workers] = slow_streams(bench)
    if "a" in only:
        _log(f"(a) throughput, {workers} worker(s)")
        results.throughput[workers] = throughput(bench)
        sampled = _profile(bench) if profile_it else None
        if sampled is not None:
            results.profiles[workers] = sampled
    if "f" in only:
        _log(f"(f) framework floor, {workers} worker(s)")
        results.floor[workers] = framework_floor(bench)
    if "b" in only:
        _log(f"(b) TTFT bursts, {workers} worker(s)")
        results.burst[workers] = burst(bench)
    if "d" in only:
        _log(f"(d) disconnects, {workers} worker(s)")
        results.disconnects[workers] = disconnects(bench)
    if "i" in only:
        _log(f"(i) stream costs next to the floor, {workers} worker(s)")
        results.costs[workers] = stream_costs(bench)


def _profile(bench: Bench) -> profile.Profile | None:
    """A second gateway run of (a) under py-spy; the measured figures come from the first."""
    executable = profile.py_spy()
    if executable is None:
        _log("py-spy not found (pip install py-spy): no profile")
        return None
    sizes = bench.sizes
    outputs = []
    samplers = []
    for pid in bench.gateway.worker_pids():
        output = RESULTS / f"profile-a-w{bench.gateway.workers}-{pid}.txt"
        outputs.append(output)
        seconds = sizes.warmup + sizes.duration + 1
        samplers.append(profile.start(bench.processes, executable, pid, seconds, output))
    _log(f"(a) again under py-spy, {bench.gateway.workers} worker(s)")
    measure_throughput(bench, bench.through_gateway(), "profiled")
    for sampler in samplers:
        sampler.wait(30)
    return profile.summarise(outputs)


def _run_clients(processes: Processes, mocks: list[Mock], sizes: Sizes) -> ClientsRun:
    _log("(e) upstream clients: httpx vs BackendPool")
    spec = ClientSpec(
        urls=[mock.url for mock in mocks],
        seconds=sizes.client_seconds,
        storm_rounds=sizes.storm_rounds,
    )
    output = processes.log_dir / "clients.json"
    meter = CpuMeter({"mocks": [mock.pid for mock in mocks]})
    meter.start()
    with output.open("wb") as sink:
        argv = python_argv("bench.clients", json.dumps(dataclasses.asdict(spec)))
        process = processes.start("clients", argv, stdout=sink)
    if process.wait(timeout=300) != 0:
        raise RuntimeError("bench.clients failed; see bench/results/logs/clients.log")
    meter.stop()
    result = ClientsResult.from_dict(json.loads(output.read_text()))
    return ClientsRun(result, 100 * meter.seconds["mocks"] / meter.wall)


def run(args: argparse.Namespace) -> tuple[ResultsWithCache, HeteroResult | None]:
    sizes = QUICK if args.quick else Sizes()
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    worker_counts = [int(count) for count in args.workers.split(",")]
    logs = RESULTS / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    for old in RESULTS.glob("profile-*.txt"):  # a previous run's samples would mix in
        old.unlink()
    results = ResultsWithCache()
    hetero = None
    with Processes(logs) as processes:
        _log(f"starting {args.mocks} lean mocks")
        mocks = [start_mock(processes, f"mock-{i + 1}", MOCK_OPTIONS) for i in range(args.mocks)]
        config = logs / "ntonix.toml"
        config.write_text(gateway_config(mocks))
        if only & GATEWAY_SCENARIOS:
            for workers in worker_counts:
                _log(f"starting the gateway with {workers} worker(s)")
                gateway = start_gateway(processes, config, workers)
                try:
                    bench = Bench(processes, mocks, sizes, gateway)
                    _run_gateway_scenarios(bench, only, results, args.profile)
                finally:
                    processes.stop(gateway.process)
        if "e" in only:
            results.clients = _run_clients(processes, mocks, sizes)
        if "g" in only:
            for workers in worker_counts:
                _log(f"(g) response cache, Zipf workload, cache off then on, {workers} worker(s)")
                results.cache[workers] = cache_scenario(
                    processes, mocks, workers, logs, quick=args.quick
                )
        if "h" in only:
            _log("(h) heterogeneous backends: least-loaded vs least-connections vs power-of-two")
            hetero = hetero_scenario(processes, logs, QUICK_HETERO if args.quick else HeteroSpec())
    return results, hetero


def _soak(minutes: float, command: str) -> int:
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with Processes(logs) as processes:
        _log(f"soak: {minutes:g} minutes")
        soak = soak_run.start(processes, logs)
        trio.run(soak_run.drive, soak, minutes * 60)
        passed, fits, steepest = soak_run.verdict(soak)
        soak_report.write(soak, passed, fits, steepest, command, RESULTS)
    _log(f"soak {'passed' if passed else 'FAILED'}; report in {RESULTS / 'soak.md'}")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    raise_open_file_limit()
    # Installed explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.soak is not None:
        try:
            return _soak(args.soak, command.strip())
        except KeyboardInterrupt:
            _log("interrupted; every subprocess has been stopped")
            return 130
    started = time.monotonic()
    try:
        results, hetero = run(args)
    except KeyboardInterrupt:
        _log("interrupted; every subprocess has been stopped")
        return 130
    workers = [int(count) for count in args.workers.split(",")]
    report = render(results, machine(), command.strip(), workers)
    if hetero is not None:
        section = ["", "## (h) Heterogeneous backends (one 3x slower), by strategy", ""]
        report += "\n".join([*section, *render_hetero(hetero)])
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text(report + "\n")
    (RESULTS / "latest.json").write_text(json.dumps(dataclasses.asdict(results), indent=1))
    if hetero is not None:
        (RESULTS / "latest-hetero.json").write_text(
            json.dumps(dataclasses.asdict(hetero), indent=1)
        )
    _log(f"done in {time.monotonic() - started:.0f} s; report in {RESULTS / 'latest.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
