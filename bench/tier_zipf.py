"""`python -m bench.tier_zipf [--quick]`: the Zipf workload of (g) on one gateway and on many.

The schedule of scenario (g) (bench/cache_bench.py: same prompts, same order, same mocks) runs,
cache on, through four topologies, each fresh:

- 1 worker, no tier: one worker process, its own cache (the figure the others must reach);
- 2 workers, no tier: two islands, each its own cache (the figure before the shared tier);
- 2 workers, `[shared] url = "embedded"`: one `ntonix serve`, its private valkey-server;
- 2 instances on one tier: two `ntonix serve` of one worker each, on one valkey-server started
  here; the connections alternate between them, as a load balancer would.

The saving is the share of requests answered without a backend request (1 - what the mocks
counted / requests). Every answer is compared byte for byte with the mock's own answer to that
request. Then bench/tier_bench.py's hit latency (an L2 hit, then an L1 hit of the same answer,
p50) completes the table. Every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from bench.cache_bench import (
    FULL,
    QUICK,
    Answer,
    Connection,
    Request,
    Target,
    Workload,
    _expected,
    _judge,
    _wire_request,
    gateway_config,
    ideal_saving,
    schedule,
)
from bench.procs import Gateway, Mock, Processes, start_gateway, start_mock
from bench.tier_bench import QUICK as TIER_QUICK
from bench.tier_bench import Sizes, hit_latency
from ntonix.embedded import EmbeddedValkey

RESULTS = Path(__file__).resolve().parent / "results"
MOCK_OPTIONS = ["--tokens", "8", "--token-delay", "0", "--ttft", "0"]
VALKEY_BYTES = 256 * 1024 * 1024


@dataclass
class TopologyRun:
    name: str
    requests: int
    backend_requests: int  # what the mocks counted
    saving_percent: float  # requests answered without a backend request
    labels: dict[str, int]  # x-ntonix-cache -> responses
    mismatches: int
    failed: int
    failure_samples: list[str]
    seconds: float
    # from /ntonix/status, summed over the gateways: tier calls past the budget or failed (each
    # a lookup or store that went on without the tier), and followers that took over
    tier_failures: int
    takeovers: int


def _log(message: str) -> None:
    print(f"[tier-zipf {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def _run_spread(
    workload: Workload, requests: list[Request], targets: list[Target]
) -> list[Answer]:
    """The schedule as (g) runs it; connection i talks to targets[i % len(targets)]."""
    answers = [Answer() for _ in requests]
    queue: Iterator[int] = iter(range(len(requests)))

    async def connection_loop(target: Target) -> None:
        connection = Connection(target)
        try:
            for index in queue:  # shared: each connection takes the next undone request
                wire = _wire_request(workload, requests[index], target)
                answers[index] = await connection.exchange(wire, stream=requests[index].stream)
        finally:
            connection.close()

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for number in range(workload.concurrency):
                nursery.start_soon(connection_loop, targets[number % len(targets)])
    return answers


def _run(
    name: str,
    workload: Workload,
    requests: list[Request],
    gateways: list[Gateway],
    mocks: list[Mock],
) -> tuple[list[Answer], TopologyRun]:
    for mock in mocks:
        mock.reset()
    started = time.monotonic()
    targets = [("127.0.0.1", gateway.port) for gateway in gateways]
    answers = trio.run(_run_spread, workload, requests, targets)
    seconds = time.monotonic() - started
    backend = sum(int(mock.stats()["requests"]) for mock in mocks)
    statuses = [gateway.status() for gateway in gateways]
    tier_failures = sum(int((s.get("shared_tier") or {}).get("failures", 0)) for s in statuses)
    takeovers = sum(int((s.get("cache") or {}).get("takeovers", 0)) for s in statuses)
    labels: dict[str, int] = {}
    for answer in answers:
        labels[answer.label or "none"] = labels.get(answer.label or "none", 0) + 1
    run = TopologyRun(
        name=name,
        requests=len(requests),
        backend_requests=backend,
        saving_percent=round(100 * (1 - backend / len(requests)), 1),
        labels=labels,
        mismatches=0,
        failed=0,
        failure_samples=[],
        seconds=round(seconds, 2),
        tier_failures=tier_failures,
        takeovers=takeovers,
    )
    _log(f"{name}: {backend} backend requests for {len(requests)}, labels {labels}")
    return answers, run


def topologies(
    processes: Processes, mocks: list[Mock], logs: Path, workload: Workload
) -> list[TopologyRun]:
    requests = schedule(workload)
    plain = gateway_config(mocks, cache=True)
    runs: list[tuple[list[Answer], TopologyRun]] = []
    valkey = EmbeddedValkey.start(VALKEY_BYTES)
    try:
        shapes = [
            ("1 worker, no tier", plain, [1]),
            ("2 workers, no tier", plain, [2]),
            ('2 workers, url = "embedded"', plain + '\n[shared]\nurl = "embedded"\n', [2]),
            ("2 instances on one tier", plain + f'\n[shared]\nurl = "{valkey.url}"\n', [1, 1]),
        ]
        for number, (name, text, workers) in enumerate(shapes):
            path = logs / f"tier-zipf-{number}.toml"
            path.write_text(text)
            gateways = [start_gateway(processes, path, count) for count in workers]
            try:
                runs.append(_run(name, workload, requests, gateways, mocks))
            finally:
                for gateway in gateways:
                    processes.stop(gateway.process)
    finally:
        valkey.stop()
    expected = _expected(workload, requests, mocks[0])
    for answers, run in runs:
        run.mismatches, run.failed, run.failure_samples = _judge(requests, answers, expected)
    return [run for _, run in runs]


def render(workload: Workload, runs: list[TopologyRun], latency: dict, command: str) -> str:
    lines = [
        f"`{command}`: {workload.describe()}. The most any cache can save on this schedule: "
        f"{ideal_saving(workload):.1f}%.",
        "",
        "| topology | backend requests | saving | wrong | failed | hit / coalesced / miss "
        "| tier calls failed | takeovers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        hits = run.labels.get("hit", 0)
        followers = run.labels.get("coalesced", 0)
        misses = run.labels.get("miss", 0)
        lines.append(
            f"| {run.name} | {run.backend_requests} of {run.requests} | "
            f"{run.saving_percent:.1f}% | {run.mismatches} | {run.failed} | "
            f"{hits} / {followers} / {misses} | {run.tier_failures} | {run.takeovers} |"
        )
    lines += [
        "",
        "| p50, ms | L1 hit | L2 hit | L2 - L1 (target: at most +1 ms) |",
        "| --- | --- | --- | --- |",
    ]
    for kind, what in (("json", "non-streaming answer"), ("stream", "streamed, 16 tokens")):
        l1, l2 = latency[f"l1_{kind}_p50_ms"], latency[f"l2_{kind}_p50_ms"]
        lines.append(f"| {what} | {l1:.3f} | {l2:.3f} | {l2 - l1:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tier_zipf")
    parser.add_argument("--quick", action="store_true", help="the (g) quick schedule")
    args = parser.parse_args(argv)
    workload = QUICK if args.quick else FULL
    sizes = TIER_QUICK if args.quick else Sizes()
    logs = RESULTS / "logs-tier-zipf"
    logs.mkdir(parents=True, exist_ok=True)
    with Processes(logs) as processes:
        mocks = [start_mock(processes, f"mock-{n + 1}", MOCK_OPTIONS) for n in range(2)]
        runs = topologies(processes, mocks, logs, workload)
        _log("hit latency: L2 then L1 for each prompt")
        valkey = EmbeddedValkey.start(VALKEY_BYTES)
        try:
            latency = hit_latency(processes, logs, mocks[0].url, valkey.url, sizes)
        finally:
            valkey.stop()
    command = "python -m bench.tier_zipf " + " ".join(argv if argv is not None else sys.argv[1:])
    report = render(workload, runs, latency, command.strip())
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tier-zipf.md").write_text(report + "\n")
    payload = {"runs": [asdict(run) for run in runs], "latency": latency}
    (RESULTS / "tier-zipf.json").write_text(json.dumps(payload, indent=1) + "\n")
    bad = sum(run.mismatches + run.failed for run in runs)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
