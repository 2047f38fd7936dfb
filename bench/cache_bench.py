"""Scenario (g): the response cache on a reproducible workload of repeating prompts.

The same schedule of chat completions (temperature 0, prompts drawn from a Zipf distribution,
streaming and non-streaming mixed, a fixed number in flight at once so that popular prompts are
asked again while their first answer is still being generated) runs through a fresh gateway with
the cache off, then through a fresh gateway with it on. What the mocks actually served
(`/mock/stats` `requests`) gives the backend requests saved; each response's `x-ntonix-cache`
header says whether it was a hit, a coalesced follower or a miss. Every answer a client received
is compared byte for byte with what a mock answers for that request when asked directly, once
per distinct request. Then, one request at a time on a keep-alive connection, the latency of a
hit is set against the framework floor of (f) (what any app served by Hypercorn this way costs)
and against the cache-off gateway relaying a tiny answer.

Invariants: the schedule is a pure function of `Workload` (its seed included), so two runs send
the same requests in the same order; nothing here tunes a figure toward a target; every process
started is registered with `Processes` and stopped before this returns.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from bench.load import connect
from bench.procs import (
    CpuMeter,
    Floor,
    Gateway,
    Mock,
    Processes,
    start_floor,
    start_gateway,
)
from bench.results import Results
from bench.stats import percentile
from bench.wire import ResponseParser, WireError, request_bytes

Target = tuple[str, int]  # (host, port)
RECEIVE_SIZE = 65536
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Workload:
    """The documented workload; every figure of (g) comes from this and nothing else."""

    prompts: int = 200  # distinct prompts
    exponent: float = 1.1  # Zipf: prompt of rank k is drawn with weight 1 / k**exponent
    seed: int = 20240  # random.Random(seed) draws the prompts and the streaming flags
    requests: int = 1000  # requests in the schedule
    concurrency: int = 32  # keep-alive connections, each sending its next request at once
    stream_share: float = 0.5  # share of streaming requests (drawn per request)
    ttft: float = 0.02  # the mock's time to first token, seconds (x-mock-ttft)
    token_delay: float = 0.01  # between tokens, seconds (x-mock-token-delay)
    min_tokens: int = 8  # tokens of the answer to prompt k: min + (7 * k) mod (max - min + 1)
    max_tokens: int = 32
    probe_rounds: int = 5  # latency probe: rounds, each target in turn
    probe_requests: int = 50  # per target and round, one at a time

    def tokens(self, rank: int) -> int:
        return self.min_tokens + (7 * rank) % (self.max_tokens - self.min_tokens + 1)

    def describe(self) -> str:
        return (
            f"{self.requests:,} chat completions, temperature 0, over {self.prompts} distinct "
            f"prompts drawn with Zipf exponent {self.exponent} (random.Random({self.seed})), "
            f"{100 * self.stream_share:.0f}% streaming (drawn per request; streaming and "
            f"non-streaming ask different questions of the cache), {self.concurrency} "
            f"keep-alive connections each sending its next request as soon as the last one "
            f"ended; answers of {self.min_tokens}-{self.max_tokens} tokens (fixed per prompt), "
            f"first token after {1000 * self.ttft:.0f} ms, then one every "
            f"{1000 * self.token_delay:.0f} ms"
        )


FULL = Workload()
QUICK = Workload(requests=400, probe_rounds=3, probe_requests=30)


@dataclass(frozen=True)
class Request:
    rank: int  # 1 = the most popular prompt
    stream: bool

    def body(self) -> bytes:
        payload = {
            "model": "mock-llm",
            "messages": [{"role": "user", "content": f"Prompt {self.rank}: tell me about it"}],
            "temperature": 0,
            "stream": self.stream,
        }
        return json.dumps(payload).encode()


def schedule(workload: Workload) -> list[Request]:
    """The requests, in the order they are handed to the connections."""
    rng = random.Random(workload.seed)
    ranks = range(1, workload.prompts + 1)
    weights = [1 / rank**workload.exponent for rank in ranks]
    drawn = rng.choices(ranks, weights, k=workload.requests)
    return [Request(rank, rng.random() < workload.stream_share) for rank in drawn]


# --- the client ---------------------------------------------------------------------------------


@dataclass
class Answer:
    """One response as a client received it."""

    status: int = 0
    label: str = ""  # x-ntonix-cache
    latency: float = math.nan  # seconds from sending the request to its last byte
    body: bytes = b""
    complete: bool = False  # the whole response arrived, and a stream ended with [DONE]
    error: str = ""


def _wire_request(workload: Workload, request: Request, target: Target) -> bytes:
    headers = {
        "content-type": "application/json",
        "x-mock-tokens": str(workload.tokens(request.rank)),
        "x-mock-ttft": str(workload.ttft),
        "x-mock-token-delay": str(workload.token_delay),
    }
    return request_bytes(
        "POST", "/v1/chat/completions", f"{target[0]}:{target[1]}", headers, request.body()
    )


def _cache_label(head: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-ntonix-cache":
            return value.strip().decode("latin-1")
    return ""


class Connection:
    """One keep-alive HTTP/1.1 connection, reopened after an error or a close."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._sock: trio.socket.SocketType | None = None
        self._parser = ResponseParser()

    async def exchange(self, wire: bytes, *, stream: bool) -> Answer:
        answer = Answer()
        try:
            if self._sock is None:
                self._sock = await connect(self.target)
            sock, parser = self._sock, self._parser
            parser.start()
            head = b""
            body: list[bytes] = []
            sent_at = time.perf_counter()
            view = memoryview(wire)
            while view:
                view = view[await sock.send(view) :]
            while not parser.complete:
                data = await sock.recv(RECEIVE_SIZE)
                if not data:
                    raise WireError("connection closed mid-response")
                if not parser.head_complete:
                    head += data
                body.append(parser.feed(data))
            answer.latency = time.perf_counter() - sent_at
            answer.status = parser.status
            answer.label = _cache_label(head.partition(b"\r\n\r\n")[0])
            answer.body = b"".join(body)
            answer.complete = answer.status == 200 and (
                answer.body.endswith(DONE) if stream else _is_json(answer.body)
            )
            if not parser.keep_alive:
                self.close()
        except (OSError, WireError) as error:
            answer.error = str(error) or type(error).__name__
            self.close()
        return answer

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._parser = ResponseParser()


def _is_json(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


async def _run_schedule(
    workload: Workload, requests: list[Request], target: Target, concurrency: int
) -> list[Answer]:
    """Every request, `concurrency` connections each taking the next one as soon as it is free."""
    answers = [Answer() for _ in requests]
    wires = [_wire_request(workload, request, target) for request in requests]
    queue: Iterator[int] = iter(range(len(requests)))

    async def connection_loop() -> None:
        connection = Connection(target)
        try:
            for index in queue:  # shared: each connection takes the next undone request
                answers[index] = await connection.exchange(
                    wires[index], stream=requests[index].stream
                )
        finally:
            connection.close()

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, len(requests))):
                nursery.start_soon(connection_loop)
    return answers


# --- the runs -----------------------------------------------------------------------------------


@dataclass
class CacheRun:
    """One pass of the schedule through one gateway."""

    cache: bool
    requests: int
    backend_requests: int  # what the mocks counted (/mock/stats requests), summed
    backend_completed: int
    backend_token_seconds: float  # sum over requests the backends served: tokens x token_delay
    labels: dict[str, int]  # x-ntonix-cache -> responses
    latency_p50_ms: dict[str, float]  # by label, and "all"
    mismatches: int  # complete answers whose bytes differ from the backend's own answer
    failed: int  # truncated, not 200, or a connection error
    failure_samples: list[str]
    seconds: float  # wall time of the whole schedule
    cpu_seconds: dict[str, float]  # gateway, mocks
    # /ntonix/status cache counters after the schedule: every worker's cache, summed
    status_cache: dict[str, int] = field(default_factory=dict)


@dataclass
class LatencyProbe:
    """One request at a time on a keep-alive connection: p50 of each target, in ms."""

    requests: int  # per target
    floor_p50_ms: float  # bench.floor: a fixed 316-byte answer from a bare Hypercorn app
    relay_p50_ms: float  # the cache-off gateway relaying the mock's 8-token answer at once
    hit_p50_ms: float  # the cache-on gateway answering the same request from the cache
    stream_hit_p50_ms: float  # a streamed hit of 16 tokens (18 SSE events)
    not_hits: int  # probe answers of the cache-on gateway that were not hits (should be 0)


@dataclass
class CacheResult:
    workload: Workload
    distinct: int  # distinct requests (prompt, streaming) in the schedule: the fewest possible
    off: CacheRun
    on: CacheRun
    probe: LatencyProbe

    @property
    def requests_saved(self) -> float:
        """Percent fewer backend requests with the cache than without."""
        if not self.off.backend_requests:
            return math.nan
        return 100 * (1 - self.on.backend_requests / self.off.backend_requests)

    @property
    def token_seconds_saved(self) -> float:
        if not self.off.backend_token_seconds:
            return math.nan
        return 100 * (1 - self.on.backend_token_seconds / self.off.backend_token_seconds)

    @property
    def bad_answers(self) -> int:
        return self.off.mismatches + self.off.failed + self.on.mismatches + self.on.failed

    @property
    def hit_added_ms(self) -> float:
        """Hit p50 minus the framework floor's p50: what a hit costs beyond Hypercorn itself."""
        return self.probe.hit_p50_ms - self.probe.floor_p50_ms


@dataclass
class ResultsWithCache(Results):
    """`Results` plus (g), by gateway worker count (results.py stays as the other scenarios
    left it)."""

    cache: dict[int, CacheResult] = field(default_factory=dict)


def cache_results(results: Results) -> dict[int, CacheResult]:
    return results.cache if isinstance(results, ResultsWithCache) else {}


def gateway_config(mocks: list[Mock], *, cache: bool) -> str:
    """The bench gateway's TOML (as `bench.procs.gateway_config`) with the cache off or on; on,
    every [cache] key is spelled out at its default."""
    lines = ["[gateway]", "graceful_timeout = 5.0", "max_connections_per_client = 0", "", "[cache]"]
    if cache:
        lines += [
            "enabled = true",
            "max_entries = 10000",
            "max_bytes = 268435456",
            "ttl = 600.0",
            'scope = "key"',
            "deterministic_only = true",
        ]
    else:
        lines.append("enabled = false")
    lines.append("")
    for mock in mocks:
        lines += ["[[backends]]", f'name = "{mock.name}"', f'url = "{mock.url}"', ""]
    return "\n".join(lines)


def _p50_ms(answers: list[Answer]) -> float:
    return 1000 * percentile([a.latency for a in answers if a.complete], 0.5)


def _judge(
    requests: list[Request], answers: list[Answer], expected: dict[Request, bytes]
) -> tuple[int, int, list[str]]:
    """(mismatches, failed, a few samples of what went wrong)."""
    mismatches = failed = 0
    samples: list[str] = []
    for request, answer in zip(requests, answers, strict=True):
        problem = ""
        if not answer.complete:
            failed += 1
            problem = answer.error or f"status {answer.status}, {len(answer.body)} bytes, cut"
        elif answer.body != expected[request]:
            mismatches += 1
            problem = f"prompt {request.rank} stream={request.stream}: other bytes"
        if problem and len(samples) < 5:
            samples.append(f"[{answer.label or 'no label'}] {problem}")
    return mismatches, failed, samples


def _run(
    workload: Workload,
    requests: list[Request],
    gateway: Gateway,
    mocks: list[Mock],
    *,
    cache: bool,
) -> tuple[list[Answer], CacheRun]:
    for mock in mocks:
        mock.reset()
    meter = CpuMeter({"gateway": gateway.pids(), "mocks": [m.pid for m in mocks]})
    meter.start()
    started = time.monotonic()
    answers = trio.run(
        _run_schedule, workload, requests, ("127.0.0.1", gateway.port), workload.concurrency
    )
    seconds = time.monotonic() - started
    meter.stop()
    stats = [mock.stats() for mock in mocks]
    labels: dict[str, int] = {}
    for answer in answers:
        key = answer.label or "none"
        labels[key] = labels.get(key, 0) + 1
    # What the backends generated: every request without the cache, the misses with it (the
    # mocks' own request count is the check that these are the same requests).
    served = [
        request
        for request, answer in zip(requests, answers, strict=True)
        if not cache or answer.label in ("miss", "bypass")
    ]
    p50 = {"all": _p50_ms(answers)}
    for name in labels:
        p50[name] = _p50_ms([a for a in answers if (a.label or "none") == name])
    run = CacheRun(
        cache=cache,
        requests=len(requests),
        backend_requests=sum(int(s["requests"]) for s in stats),
        backend_completed=sum(int(s["completed"]) for s in stats),
        backend_token_seconds=sum(workload.tokens(r.rank) * workload.token_delay for r in served),
        labels=labels,
        latency_p50_ms=p50,
        mismatches=0,
        failed=0,
        failure_samples=[],
        seconds=seconds,
        cpu_seconds={name: meter.seconds[name] for name in ("gateway", "mocks")},
        status_cache=_status_cache(gateway) if cache else {},
    )
    return answers, run


def _status_cache(gateway: Gateway) -> dict[str, int]:
    """The cache counters of /ntonix/status: whichever worker answers, all workers' summed."""
    cache = gateway.status().get("cache") or {}
    return {name: int(value) for name, value in cache.items() if isinstance(value, int)}


async def _probe_target(target: Target, wire: bytes, count: int, *, stream: bool) -> list[Answer]:
    connection = Connection(target)
    try:
        return [await connection.exchange(wire, stream=stream) for _ in range(count)]
    finally:
        connection.close()


def _probe(workload: Workload, floor: Floor, off: Gateway, on: Gateway) -> LatencyProbe:
    """Hit latency against the floor and the relay, one request at a time, targets in turn."""
    small = json.dumps(
        {
            "model": "mock-llm",
            "messages": [{"role": "user", "content": "probe"}],
            "temperature": 0,
            "stream": False,
        }
    ).encode()
    streamed = json.dumps(
        {
            "model": "mock-llm",
            "messages": [{"role": "user", "content": "probe the stream"}],
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    json_headers = {"content-type": "application/json"}

    def wire(port: int, body: bytes, headers: dict[str, str]) -> bytes:
        return request_bytes(
            "POST", "/v1/chat/completions", f"127.0.0.1:{port}", {**json_headers, **headers}, body
        )

    # The mocks answer 8 tokens at once by default: the relay's answer is as small as the floor's.
    targets = {
        "floor": (floor.port, wire(floor.port, small, {}), False),
        "relay": (off.port, wire(off.port, small, {}), False),
        "hit": (on.port, wire(on.port, small, {}), False),
        "stream_hit": (on.port, wire(on.port, streamed, {"x-mock-tokens": "16"}), True),
    }
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    not_hits = 0
    for round_ in range(workload.probe_rounds + 1):  # round 0 warms up (and fills the cache)
        for name, (port, request, stream) in targets.items():
            probe = partial(_probe_target, stream=stream)
            answers = trio.run(probe, ("127.0.0.1", port), request, workload.probe_requests)
            bad = [a for a in answers if not a.complete]
            if bad:
                raise RuntimeError(f"latency probe {name}: {bad[0].error or bad[0].status}")
            if round_ == 0:
                continue
            latencies[name] += [a.latency for a in answers]
            if name in ("hit", "stream_hit"):
                not_hits += sum(1 for a in answers if a.label != "hit")

    def p50(name: str) -> float:
        return 1000 * percentile(latencies[name], 0.5)

    return LatencyProbe(
        requests=workload.probe_rounds * workload.probe_requests,
        floor_p50_ms=p50("floor"),
        relay_p50_ms=p50("relay"),
        hit_p50_ms=p50("hit"),
        stream_hit_p50_ms=p50("stream_hit"),
        not_hits=not_hits,
    )


def _expected(workload: Workload, requests: list[Request], mock: Mock) -> dict[Request, bytes]:
    """What the backend answers to each distinct request, asked directly once."""
    distinct = list(dict.fromkeys(requests))
    answers = trio.run(
        _run_schedule, workload, distinct, (mock.host, mock.port), workload.concurrency
    )
    expected = {}
    for request, answer in zip(distinct, answers, strict=True):
        if not answer.complete:
            raise RuntimeError(f"the mock's own answer to {request} was incomplete: {answer}")
        expected[request] = answer.body
    return expected


def cache_scenario(
    processes: Processes, mocks: list[Mock], workers: int, log_dir: Path, *, quick: bool
) -> CacheResult:
    """(g): the schedule through a fresh cache-off gateway, then a fresh cache-on one; the
    latency probe with both (and the floor) up; then the backend's own answers to compare."""
    workload = QUICK if quick else FULL
    requests = schedule(workload)
    gateways: dict[bool, Gateway] = {}
    runs: dict[bool, tuple[list[Answer], CacheRun]] = {}
    floor: Floor | None = None
    try:
        for cache in (False, True):
            path = log_dir / f"ntonix-cache-{'on' if cache else 'off'}.toml"
            path.write_text(gateway_config(mocks, cache=cache))
            gateways[cache] = start_gateway(processes, path, workers)
            runs[cache] = _run(workload, requests, gateways[cache], mocks, cache=cache)
        floor = start_floor(processes)
        probe = _probe(workload, floor, gateways[False], gateways[True])
    finally:
        if floor is not None:
            processes.stop(floor.process)
        for gateway in gateways.values():
            processes.stop(gateway.process)
    expected = _expected(workload, requests, mocks[0])
    for answers, run in runs.values():
        run.mismatches, run.failed, run.failure_samples = _judge(requests, answers, expected)
    return CacheResult(
        workload=workload,
        distinct=len(set(requests)),
        off=runs[False][1],
        on=runs[True][1],
        probe=probe,
    )


def ideal_saving(workload: Workload) -> float:
    """Percent of backend requests a cache that never forgets could save on this schedule."""
    requests = schedule(workload)
    return 100 * (1 - len(set(requests)) / len(requests))
