"""Scenario (h): heterogeneous backends, one three times slower, under each strategy.

Two lean mocks with a real queue (`--slots`) that speak vLLM's signals (`--engine vllm`): a fast
one and one whose first token and every token after it take three times as long. For each
strategy in turn, a fresh gateway (one worker, every other key at its default: signals read
every second) gets the same open-loop schedule of streaming chat completions (Poisson arrivals
from a seeded `random.Random`) at each rate: a warm-up that is not measured, then the window.
Per request: the time to the first body bytes (the role chunk goes out with the first token) and
to `[DONE]`, and which backend answered (`x-ntonix-backend`). The strategies run in turn,
`rounds` times, so that a disturbance of this shared machine hits them alike; the report gives
each strategy's p50 and p99 over all its rounds and its ratio to least-loaded.

Invariants: the schedule is a pure function of `HeteroSpec`; nothing here tunes a figure toward
a target; every process started is registered with `Processes` and stopped before this returns.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from bench.procs import Mock, Processes, start_gateway, start_mock
from bench.stats import percentile

STRATEGIES = ("least-loaded", "least-connections", "power-of-two")
BODY = {
    "model": "mock-llm",
    "messages": [{"role": "user", "content": "Tell me a story"}],
    "stream": True,
}


@dataclass(frozen=True)
class HeteroSpec:
    rates: tuple[float, ...] = (8.0, 10.0, 12.0)  # requests per second, Poisson arrivals
    warmup: float = 5.0  # seconds of the schedule before the measured window
    duration: float = 20.0  # measured seconds per strategy and round
    rounds: int = 2
    seed: int = 1313
    slots: int = 4  # per backend: at most 4 generate at once, the rest queue
    tokens: int = 16
    ttft: float = 0.05  # the fast backend; the slow one takes 3x as long for each
    token_delay: float = 0.02
    slowdown: float = 3.0

    def describe(self) -> str:
        fast = self.ttft + (self.tokens - 1) * self.token_delay
        return (
            f"two backends of {self.slots} slots each; the fast one answers {self.tokens} tokens "
            f"in {1000 * fast:.0f} ms (first after {1000 * self.ttft:.0f} ms), the slow one "
            f"{self.slowdown:g}x slower in every token (the fast one alone serves about "
            f"{self.slots / fast:.1f} requests/s, both together about "
            f"{self.slots / fast * (1 + 1 / self.slowdown):.1f}/s); streaming chat completions "
            f"arriving as a Poisson process (random.Random({self.seed})) at each rate, "
            f"{self.warmup:g} s of warm-up then {self.duration:g} s measured, per strategy and "
            f"round, {self.rounds} rounds"
        )

    def arrivals(self, rate: float) -> list[float]:
        rng = random.Random(self.seed)
        at, times = 0.0, []
        while at < self.warmup + self.duration:
            at += rng.expovariate(rate)
            times.append(at)
        return times


QUICK_HETERO = HeteroSpec(warmup=3.0, duration=8.0, rounds=1)


@dataclass
class StrategyRun:
    ttft: list[float] = field(default_factory=list)  # seconds, measured window only
    completion: list[float] = field(default_factory=list)
    slow_share: list[float] = field(default_factory=list)  # per round
    errors: int = 0


@dataclass
class HeteroResult:
    spec: str
    runs: dict[str, dict[str, StrategyRun]]  # rate ("8/s") -> strategy -> its runs


async def _one(
    client: httpx.AsyncClient, url: str, measured: bool, run: StrategyRun, served: list[str]
) -> None:
    sent = time.perf_counter()
    first: float | None = None
    try:
        async with client.stream("POST", url, json=BODY) as response:
            if response.status_code != 200:
                run.errors += measured
                return
            async for chunk in response.aiter_raw():
                if first is None and chunk:
                    first = time.perf_counter()
            done = time.perf_counter()
            backend = response.headers.get("x-ntonix-backend", "")
    except httpx.HTTPError:
        run.errors += measured
        return
    if measured and first is not None:
        run.ttft.append(first - sent)
        run.completion.append(done - sent)
        served.append(backend)


async def _drive(gateway_url: str, spec: HeteroSpec, rate: float, run: StrategyRun) -> None:
    url = f"{gateway_url}/v1/chat/completions"
    served: list[str] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with (
        httpx.AsyncClient(timeout=60, limits=limits) as client,
        trio.open_nursery() as nursery,
    ):
        start = trio.current_time()
        for at in spec.arrivals(rate):
            await trio.sleep_until(start + at)
            nursery.start_soon(_one, client, url, at >= spec.warmup, run, served)
    run.slow_share.append(served.count("slow") / len(served) if served else float("nan"))


def _config(mocks: list[Mock], strategy: str) -> str:
    lines = [
        "[gateway]",
        "graceful_timeout = 5.0",
        "",
        "[balancer]",
        f'strategy = "{strategy}"',
        "",
        "[cache]",
        "enabled = false",
        "",
    ]
    for mock in mocks:
        lines += ["[[backends]]", f'name = "{mock.name}"', f'url = "{mock.url}"', ""]
    return "\n".join(lines)


def hetero_scenario(processes: Processes, logs: Path, spec: HeteroSpec) -> HeteroResult:
    common = ["--slots", str(spec.slots), "--engine", "vllm", "--tokens", str(spec.tokens)]
    mocks = [
        start_mock(
            processes,
            "fast",
            [*common, "--ttft", str(spec.ttft), "--token-delay", str(spec.token_delay)],
        ),
        start_mock(
            processes,
            "slow",
            [
                *common,
                "--ttft",
                str(spec.ttft * spec.slowdown),
                "--token-delay",
                str(spec.token_delay * spec.slowdown),
            ],
        ),
    ]
    runs = {f"{rate:g}/s": {s: StrategyRun() for s in STRATEGIES} for rate in spec.rates}
    # The mocks stay up until the run's `Processes` stops everything on its way out.
    for _ in range(spec.rounds):
        for rate in spec.rates:
            for strategy in STRATEGIES:
                config = logs / f"hetero-{strategy}.toml"
                config.write_text(_config(mocks, strategy))
                gateway = start_gateway(processes, config, 1)
                try:
                    time.sleep(1.5)  # the first readings of both engines
                    trio.run(_drive, gateway.url, spec, rate, runs[f"{rate:g}/s"][strategy])
                finally:
                    processes.stop(gateway.process)
    return HeteroResult(spec.describe(), runs)


def render_hetero(result: HeteroResult) -> list[str]:
    def ms(value: float) -> str:
        return f"{1000 * value:.0f}"

    lines = [
        result.spec + ".",
        "",
        "| load | strategy | requests | errors | to the slow one | TTFT p50 | TTFT p99 | "
        "completion p50 | completion p99 | TTFT p99 / least-loaded | completion p99 / "
        "least-loaded |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rate, by_strategy in result.runs.items():
        base = by_strategy["least-loaded"]
        for strategy, run in by_strategy.items():
            share = sum(run.slow_share) / len(run.slow_share) if run.slow_share else math.nan
            lines.append(
                f"| {rate} | {strategy} | {len(run.ttft)} | {run.errors} | {100 * share:.0f}% | "
                f"{ms(percentile(run.ttft, 0.5))} | {ms(percentile(run.ttft, 0.99))} | "
                f"{ms(percentile(run.completion, 0.5))} | "
                f"{ms(percentile(run.completion, 0.99))} | "
                f"{percentile(run.ttft, 0.99) / percentile(base.ttft, 0.99):.2f} | "
                f"{percentile(run.completion, 0.99) / percentile(base.completion, 0.99):.2f} |"
            )
    lines += ["", "Times in ms, measured by the client (first body bytes; `[DONE]`).", ""]
    return lines
