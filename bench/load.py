"""The load generator: `python -m bench.load SPEC_JSON` prints one JSON result on stdout.

It runs on raw Trio sockets with the hand-written framing of `bench.wire`, because it must stay
far from saturation while the gateway is. The orchestrator starts several of these processes and
gives them one wall-clock `start_at`, so that they load the target together.

Two modes:
- `requests`: `connections` keep-alive connections each send one request after another for
  `warmup + duration` seconds; only responses completed inside the measurement window count.
- `streams`: `connections` streams start at once, each on a new connection (a burst); for each one
  the time to the first token, whether it completed, and, with `hangup_after`, the wall-clock
  time at which the client closed its socket after that many tokens.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import socket
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import trio

from bench.wire import ResponseParser, WireError, request_bytes

RECEIVE_SIZE = 65536


@dataclass(frozen=True)
class LoadSpec:
    mode: str  # "requests" or "streams"
    targets: list[tuple[str, int]]  # connections are spread over them round-robin
    connections: int
    body: str  # the JSON request body
    start_at: float  # time.time() at which every load process starts
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = field(default_factory=dict)
    warmup: float = 0.0  # requests: seconds before the measurement window opens
    duration: float = 0.0  # requests: length of the measurement window
    hangup_after: int = 0  # streams: close after this many tokens; 0 reads to the end
    timeout: float = 60.0  # streams: the longest one stream may take
    id_prefix: str = "bench"  # streams: x-request-id is f"{id_prefix}-{index}"

    @classmethod
    def from_json(cls, text: str) -> LoadSpec:
        data = json.loads(text)
        data["targets"] = [tuple(target) for target in data["targets"]]
        return cls(**data)


@dataclass
class RequestsResult:
    completed: int = 0  # inside the measurement window
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, window only
    window: float = 0.0
    cpu: float = 0.0  # CPU seconds this process used during the window
    error_samples: list[str] = field(default_factory=list)


@dataclass
class StreamRecord:
    request_id: str
    ok: bool = False
    ttft: float | None = None  # seconds from connect to the first token
    connected: float | None = None  # seconds from the start of connect() to its return
    tokens: int = 0
    error: str = ""
    closed_at: float | None = None  # time.time() right when the client hung up


@dataclass
class StreamsResult:
    streams: list[StreamRecord] = field(default_factory=list)
    elapsed: float = 0.0
    cpu: float = 0.0


def raise_open_file_limit() -> None:
    """Many sockets per process: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def connect(target: tuple[str, int]) -> trio.socket.SocketType:
    """A TCP socket to `target` with Nagle off (closed again if connecting fails)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


def _request(spec: LoadSpec, target: tuple[str, int], extra: dict[str, str]) -> bytes:
    headers = {"content-type": "application/json", **spec.headers, **extra}
    return request_bytes("POST", spec.path, f"{target[0]}:{target[1]}", headers, spec.body.encode())


async def _request_loop(
    spec: LoadSpec, target: tuple[str, int], window: tuple[float, float], result: RequestsResult
) -> None:
    """One keep-alive connection sending requests back to back until the window closes."""
    request = _request(spec, target, {})
    opened, closes = window
    latencies = result.latencies
    clock = time.perf_counter
    while clock() < closes:
        try:
            sock = await connect(target)
        except OSError as error:
            _count_error(result, f"connect: {error}")
            await trio.sleep(0.05)  # do not spin on a refusing server
            continue
        parser = ResponseParser()
        try:
            while clock() < closes:
                sent_at = clock()
                await _send_all(sock, request)
                parser.start()
                while not parser.complete:
                    data = await sock.recv(RECEIVE_SIZE)
                    if not data:
                        raise WireError("connection closed mid-response")
                    parser.feed(data)
                done_at = clock()
                if parser.status != 200:
                    raise WireError(f"status {parser.status}")
                if opened <= done_at < closes:
                    result.completed += 1
                    latencies.append(done_at - sent_at)
                if not parser.keep_alive:
                    break
        except (OSError, WireError) as error:
            if clock() < closes:
                _count_error(result, str(error))
        finally:
            sock.close()


def _count_error(result: RequestsResult, message: str) -> None:
    result.errors += 1
    if len(result.error_samples) < 5:
        result.error_samples.append(message)


async def run_requests(spec: LoadSpec) -> RequestsResult:
    result = RequestsResult()
    start = time.perf_counter()
    window = (start + spec.warmup, start + spec.warmup + spec.duration)
    async with trio.open_nursery() as nursery:
        for index in range(spec.connections):
            target = spec.targets[index % len(spec.targets)]
            nursery.start_soon(_request_loop, spec, target, window, result)
        await trio.sleep_until(trio.current_time() + spec.warmup)
        cpu_at_open = time.process_time()
        await trio.sleep(spec.duration)
        result.cpu = time.process_time() - cpu_at_open
    result.window = spec.duration
    return result


async def _one_stream(spec: LoadSpec, target: tuple[str, int], record: StreamRecord) -> None:
    """One streaming request on its own connection; fills in `record`, never raises."""
    started = time.perf_counter()
    request = _request(spec, target, {"x-request-id": record.request_id})
    events = 0
    saw_done = False
    pending = b""
    try:
        with trio.fail_after(spec.timeout):
            sock = await connect(target)
            record.connected = time.perf_counter() - started
            try:
                await _send_all(sock, request)
                parser = ResponseParser()
                while not parser.complete:
                    data = await sock.recv(RECEIVE_SIZE)
                    if not data:
                        raise WireError("connection closed mid-stream")
                    body = parser.feed(data)
                    if parser.head_complete and parser.status != 200:
                        raise WireError(f"status {parser.status}")
                    if not body:
                        continue
                    # SSE events end with a blank line. The first is the role-only chunk, so
                    # event 2 carries the first token.
                    *finished, pending = (pending + body).split(b"\n\n")
                    events += len(finished)
                    saw_done = saw_done or b"data: [DONE]" in finished
                    record.tokens = max(events - 1, 0)
                    if record.ttft is None and events >= 2:
                        record.ttft = time.perf_counter() - started
                    if spec.hangup_after and record.tokens >= spec.hangup_after:
                        record.closed_at = time.time()
                        sock.close()
                        record.ok = True
                        return
            finally:
                sock.close()
        record.ok = saw_done and not spec.hangup_after
        if not record.ok:
            record.error = "stream ended without [DONE]" if not saw_done else "ended before hangup"
    except trio.TooSlowError:
        record.error = f"timed out after {spec.timeout:g} s"
    except (OSError, WireError) as error:
        record.error = str(error) or type(error).__name__


async def run_streams(spec: LoadSpec) -> StreamsResult:
    result = StreamsResult()
    cpu_at_start = time.process_time()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(spec.connections):
            record = StreamRecord(request_id=f"{spec.id_prefix}-{index}")
            result.streams.append(record)
            target = spec.targets[index % len(spec.targets)]
            nursery.start_soon(_one_stream, spec, target, record)
    result.elapsed = time.perf_counter() - started
    result.cpu = time.process_time() - cpu_at_start
    return result


async def run(spec: LoadSpec) -> RequestsResult | StreamsResult:
    await trio.sleep(max(0.0, spec.start_at - time.time()))
    if spec.mode == "requests":
        return await run_requests(spec)
    if spec.mode == "streams":
        return await run_streams(spec)
    raise ValueError(f"unknown mode {spec.mode!r}")


def main(argv: list[str]) -> int:
    raise_open_file_limit()
    spec = LoadSpec.from_json(argv[0] if argv else sys.stdin.read())
    result = trio.run(partial(run, spec))
    json.dump(dataclasses.asdict(result), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
