"""`python -m bench --soak MINUTES`: the gateway under mixed load and recurring faults, sampled.

Three lean mocks and `ntonix serve --workers 2` (through `tests.chaos.census`, which adds the
workers' Trio task counts) run for MINUTES with: non-streaming requests at a steady rate, a
third of them repeats that the cache answers; long streams; a stream the client drops every
second; a reload (SIGHUP) every minute; one backend killed and restarted 20 s later every
2 minutes; one worker SIGKILLed every 10 minutes. Every 5 s: the workers' RSS, open fds and
Trio tasks (summed), the pooled upstream connections and the queue.

Pass: no unexpected client error (a request that started from 5 s before a worker's death to
3 s after it and was cut, or a stream on the killed backend ending with an error event, is
expected; a non-streaming request
that fails otherwise is not), and RSS, fds and tasks flat: the slope of a least-squares fit over
the last 20 minutes (after a 2-minute warm-up, leaving out the 90 s after each worker kill,
while the replacement warms up) under 1% of the mean per 10 minutes. The steepest fit within
one stretch between kills is reported too: a growth that each replacement's smaller start
would hide from the whole-window fit shows there. Ctrl-C or SIGTERM ends the run early, with
the report of what it saw. Writes soak.md, soak.json
and soak.png (matplotlib, the `bench` extra) to bench/results/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench.procs import (
    Mock,
    Processes,
    command_line,
    descendants,
    free_port,
    python_argv,
    start_mock,
)
from tests.chaos.harness import tasks_of

SAMPLE_EVERY = 5.0
RELOAD_EVERY = 60.0
FLAP_EVERY = 120.0
FLAP_DOWN = 20.0
KILL_WORKER_EVERY = 600.0
WARMUP = 120.0
MIN_SAMPLES = 12  # a minute of them: fewer fit no line worth a verdict
AFTER_KILL = 90.0
FIT_WINDOW = 20 * 60.0
FLAT = 0.01  # of the mean, per 10 minutes
PLAIN_RATE = 10.0  # per second
STREAMS = 6
MOCK_OPTIONS = ["--tokens", "8", "--token-delay", "0.005", "--ttft", "0.005"]
LONG_STREAM = {"x-mock-tokens": "40", "x-mock-token-delay": "0.05"}
# A request that was in flight on the worker when it was killed (a plain one lasts well under a
# second, a long stream 2 s), or that met its connection closing just after.
EXPECTED_BEFORE_KILL = 5.0
EXPECTED_AFTER_KILL = 3.0


@attrs.frozen
class Sample:
    at: float  # seconds since the start
    rss_mib: float
    fds: int
    tasks: int
    pooled: int
    queued: int


@attrs.define
class Tally:
    plain: int = 0
    cache_hits: int = 0
    streams: int = 0
    dropped_by_client: int = 0
    expected_errors: int = 0
    unexpected: list[str] = attrs.Factory(list)


@attrs.define
class Soak:
    processes: Processes
    mocks: list[Mock]
    gateway: subprocess.Popen[bytes]
    url: str
    census: Path
    started: float = attrs.Factory(time.monotonic)
    samples: list[Sample] = attrs.Factory(list)
    events: list[tuple[float, str]] = attrs.Factory(list)
    tally: Tally = attrs.Factory(Tally)
    worker_killed_at: list[float] = attrs.Factory(list)
    backend_down: tuple[float, float] | None = None  # when the flapping one was down

    def now(self) -> float:
        return time.monotonic() - self.started

    def workers(self) -> list[int]:
        pids = descendants(self.gateway.pid)
        return [pid for pid in pids if "spawn_main" in command_line(pid)]

    def note(self, event: str) -> None:
        self.events.append((self.now(), event))

    def expected(self, at: float) -> bool:
        """Whether a failure at `at` may be the work of a fault this run injected."""
        return any(
            -EXPECTED_BEFORE_KILL <= at - killed <= EXPECTED_AFTER_KILL
            for killed in self.worker_killed_at
        )


def _sum_rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def _sample(soak: Soak, client: httpx.AsyncClient) -> None:
    while True:
        await trio.sleep(SAMPLE_EVERY)
        try:
            pids = soak.workers()
            status = (await client.get(f"{soak.url}/ntonix/status")).json()
            tasks = sum([await tasks_of(soak.census, pid) for pid in pids])
            fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)
            rss = _sum_rss_kib(pids) / 1024
        except (OSError, httpx.HTTPError, ValueError) as error:
            soak.note(f"no sample: {error!r}")  # a worker replaced between the reads
            continue
        pooled = sum(
            b["pool"]["idle"] + b["pool"]["in_use"] for b in status["backends"] if b["pool"]
        )
        soak.samples.append(Sample(soak.now(), rss, fds, tasks, pooled, status["queued"]))


async def _plain(soak: Soak, client: httpx.AsyncClient, number: int) -> None:
    repeat = number % 3 == 0
    content = f"repeat {number % 20}" if repeat else f"question {number}"
    body = {"model": "mock-llm", "messages": [{"role": "user", "content": content}]}
    if repeat:
        body["temperature"] = 0
    at = soak.now()
    try:
        response = await client.post(f"{soak.url}/v1/chat/completions", json=body)
    except httpx.HTTPError as error:
        _failed(soak, at, f"plain at {at:.1f} s: {error!r}")
        return
    soak.tally.plain += 1
    if response.headers.get("x-ntonix-cache") == "hit":
        soak.tally.cache_hits += 1
    if response.status_code != 200:
        _failed(soak, at, f"plain at {at:.1f} s: {response.status_code} {response.text[:200]}")


def _failed(soak: Soak, at: float, what: str) -> None:
    if soak.expected(at):
        soak.tally.expected_errors += 1
    else:
        soak.tally.unexpected.append(what)


async def _stream(soak: Soak, client: httpx.AsyncClient, drop_after: float | None) -> None:
    at = soak.now()
    body = b""
    backend = ""
    chat = {"model": "mock-llm", "messages": [{"role": "user", "content": "s"}], "stream": True}
    url = f"{soak.url}/v1/chat/completions"
    try:
        with trio.move_on_after(drop_after if drop_after is not None else float("inf")):
            async with client.stream("POST", url, json=chat, headers=LONG_STREAM) as response:
                backend = response.headers.get("x-ntonix-backend", "")
                async for chunk in response.aiter_raw():
                    body += chunk
                if drop_after is None and b"data: [DONE]" not in body:
                    down = soak.backend_down
                    on_flapping = backend == soak.mocks[-1].name and down is not None
                    if on_flapping or soak.expected(at) or soak.expected(soak.now()):
                        soak.tally.expected_errors += 1
                    else:
                        soak.tally.unexpected.append(f"stream at {at:.1f} s: {body[-200:]!r}")
    except httpx.HTTPError as error:
        _failed(soak, soak.now(), f"stream at {at:.1f} s: {error!r}")
    if drop_after is not None:
        soak.tally.dropped_by_client += 1
    else:
        soak.tally.streams += 1


async def _load(soak: Soak, client: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:

        async def streams() -> None:
            while True:
                await _stream(soak, client, None)

        async def drops() -> None:
            while True:
                nursery.start_soon(_stream, soak, client, 0.5)
                await trio.sleep(1.0)

        for _ in range(STREAMS):
            nursery.start_soon(streams)
        nursery.start_soon(drops)
        number = 0
        while True:
            nursery.start_soon(_plain, soak, client, number)
            number += 1
            await trio.sleep(1 / PLAIN_RATE)


async def _faults(soak: Soak) -> None:
    next_reload, next_flap, next_kill = RELOAD_EVERY, FLAP_EVERY, KILL_WORKER_EVERY
    async with trio.open_nursery() as nursery:
        while True:
            due = min(next_reload, next_flap, next_kill)
            await trio.sleep(max(0.0, due - soak.now()))
            if due == next_reload:
                next_reload += RELOAD_EVERY
                os.kill(soak.gateway.pid, signal.SIGHUP)
                soak.note("reload")
            elif due == next_flap:
                next_flap += FLAP_EVERY
                nursery.start_soon(_flap, soak)  # its 30 s must not hold up the next fault
            else:
                next_kill += KILL_WORKER_EVERY
                victim = soak.workers()[0]
                soak.worker_killed_at.append(soak.now())
                os.kill(victim, signal.SIGKILL)
                soak.note(f"worker {victim} killed")


async def _flap(soak: Soak) -> None:
    mock = soak.mocks[-1]
    soak.backend_down = (soak.now(), soak.now() + FLAP_DOWN)
    os.kill(mock.pid, signal.SIGKILL)
    soak.note(f"{mock.name} killed")
    await trio.sleep(FLAP_DOWN)
    argv = python_argv("mocks.llm", "--port", str(mock.port), "--lean", "--name", mock.name)
    process = soak.processes.start(mock.name, [*argv, *MOCK_OPTIONS], stdout=subprocess.DEVNULL)
    soak.mocks[-1] = Mock(mock.name, mock.host, mock.port, process.pid)
    soak.note(f"{mock.name} restarted")
    await trio.sleep(10)  # streams that were on it have ended by now
    soak.backend_down = None


async def drive(soak: Soak, seconds: float) -> None:
    # Idle connections are let go after 2 s, before Hypercorn's keep-alive timeout (5 s) closes
    # them: a request sent just as the server closes its connection fails (keep-alive's race).
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=2)
    client = httpx.AsyncClient(timeout=30, limits=limits)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with client, trio.open_nursery() as nursery:
            nursery.start_soon(_sample, soak, client)
            nursery.start_soon(_load, soak, client)
            nursery.start_soon(_faults, soak)
            with trio.move_on_after(seconds):
                async for number in signals:
                    soak.note(f"stopped early by {signal.Signals(number).name}")
                    break
            nursery.cancel_scope.cancel()


def slope_per_10_min(samples: list[Sample], field: str) -> tuple[float, float]:
    """(slope per 10 minutes, mean) of a least-squares line through `field` over time."""
    xs = [sample.at for sample in samples]
    ys = [float(getattr(sample, field)) for sample in samples]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return slope * 600, mean_y


def segments(soak: Soak) -> list[list[Sample]]:
    """The samples of the last `FIT_WINDOW`, after the warm-up, cut at each worker kill and
    without the `AFTER_KILL` that follow one: stretches where the same processes ran."""
    end = soak.samples[-1].at if soak.samples else 0.0
    start = max(WARMUP, end - FIT_WINDOW)
    cuts = [*sorted(soak.worker_killed_at), float("inf")]
    pieces: list[list[Sample]] = [[] for _ in cuts]
    for sample in soak.samples:
        if sample.at < start or any(0 <= sample.at - k < AFTER_KILL for k in cuts):
            continue
        pieces[next(i for i, cut in enumerate(cuts) if sample.at < cut)].append(sample)
    return [piece for piece in pieces if len(piece) >= MIN_SAMPLES]


def start(processes: Processes, logs: Path) -> Soak:
    mocks = [start_mock(processes, f"mock-{i + 1}", MOCK_OPTIONS) for i in range(3)]
    config = logs / "soak.toml"
    lines = [
        "[gateway]",
        "graceful_timeout = 5.0",
        "upstream_connect_timeout = 1.0",
        "first_byte_timeout = 5.0",
        "[health]",
        "interval = 1.0",
        "open_for = 2.0",
        "max_open_for = 8.0",
        "[log]",
        f'access_log = "{logs / "soak-access.log"}"',
    ]
    for mock in mocks:
        lines += ["[[backends]]", f'name = "{mock.name}"', f'url = "{mock.url}"']
    config.write_text("\n".join(lines) + "\n")
    census = Path(tempfile.mkdtemp(prefix="soak-census-"))
    os.environ["NTONIX_CENSUS"] = str(census)
    port = free_port()
    argv = python_argv("tests.chaos.census", "serve", "--config", str(config), "--workers", "2")
    gateway = processes.start("soak-gateway", [*argv, "--bind", f"127.0.0.1:{port}"])
    soak = Soak(processes, mocks, gateway, f"http://127.0.0.1:{port}", census)
    deadline = time.monotonic() + 60
    while len(list(census.glob("*.sock"))) < 2:
        if time.monotonic() > deadline or gateway.poll() is not None:
            raise RuntimeError("the soak's gateway did not start; see its log")
        time.sleep(0.1)
    soak.started = time.monotonic()
    return soak


def _fit(samples: list[Sample], field: str) -> dict[str, float]:
    slope, mean = slope_per_10_min(samples, field)
    minutes = (samples[-1].at - samples[0].at) / 60
    return {"slope_per_10_min": slope, "mean": mean, "share": slope / mean, "minutes": minutes}


def verdict(soak: Soak) -> tuple[bool, dict[str, Any], dict[str, Any]]:
    """Pass or not; the fits the verdict rests on (the last 20 minutes after the warm-up, less
    the `AFTER_KILL` that follow each kill); and for information the steepest fit within one
    stretch between kills, where the same processes ran (short and noisy, but a slow growth
    that each replacement's smaller start would hide shows there)."""
    window = [sample for piece in segments(soak) for sample in piece]
    fits: dict[str, Any] = {}
    steepest: dict[str, Any] = {}
    flat = len(window) >= MIN_SAMPLES
    for field in ("rss_mib", "fds", "tasks"):
        if len(window) < MIN_SAMPLES:
            break
        fits[field] = _fit(window, field)
        flat = flat and abs(fits[field]["share"]) < FLAT
        within = [_fit(piece, field) for piece in segments(soak)]
        steepest[field] = max(within, key=lambda fit: abs(fit["share"]))
    return flat and not soak.tally.unexpected, fits, steepest
