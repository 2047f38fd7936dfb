"""`python -m bench.metrics_cost`: what one request's metric updates cost, per way of counting.

Why /metrics is built from plain tallies rather than prometheus-client's multiprocess mode (the
library's own way to sum workers): the updates a finished request makes (its counter, two
histograms, bytes, chunks, the in-flight gauges, one attempt) run 200,000 times each way, in
a fresh process each (multiprocess mode is chosen when prometheus-client is imported):

- `tallies`: `Tallies.begin` / `finish` and the attempt's dictionary increments, as the
  gateway does;
- `library`: the same updates on prometheus-client metric objects, one process;
- `multiprocess`: the same with PROMETHEUS_MULTIPROC_DIR set, every update written to an
  mmap'd file (what N workers summed by the library would pay).

Prints microseconds of CPU per request, the best of five runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

REQUESTS = 200_000
MODES = ("tallies", "library", "multiprocess")


def _record() -> object:
    from ntonix.core.telemetry import RequestRecord

    record = RequestRecord(
        started=0.0,
        wall_time=0.0,
        request_id=b"r",
        client="127.0.0.1",
        method="POST",
        path="/v1/chat/completions",
        cache="bypass",
    )
    record.backend, record.status, record.bytes_in = "mock-a", 200, 120
    record.note_body(600, lambda: 0.004)
    return record


def _with_tallies() -> Callable[[object], None]:
    from ntonix.core.telemetry import RequestRecord, Tallies

    tallies = Tallies()
    in_flight = {"mock-a": 0}

    def one(record: object) -> None:
        assert isinstance(record, RequestRecord)
        tallies.begin()
        in_flight["mock-a"] += 1
        tallies.attempts[("mock-a", "completed")] += 1
        in_flight["mock-a"] -= 1
        tallies.finish(record, 0.01)

    return one


def _with_library() -> Callable[[object], None]:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from ntonix.core.telemetry import LATENCY_BUCKETS, RequestRecord

    registry = CollectorRegistry()
    requests = Counter("r", "", ["route", "backend", "status", "cache"], registry=registry)
    durations = Histogram("d", "", ["backend"], buckets=LATENCY_BUCKETS, registry=registry)
    ttfts = Histogram("t", "", ["backend"], buckets=LATENCY_BUCKETS, registry=registry)
    chunks = Counter("c", "", ["backend"], registry=registry)
    bytes_out = Counter("o", "", ["backend"], registry=registry)
    bytes_in = Counter("i", "", registry=registry)
    active = Gauge("a", "", multiprocess_mode="livesum", registry=registry)
    attempts = Counter("u", "", ["backend", "outcome"], registry=registry)
    in_flight = Gauge("f", "", ["backend"], multiprocess_mode="livesum", registry=registry)

    def one(record: object) -> None:
        assert isinstance(record, RequestRecord)
        backend = record.backend
        active.inc()
        in_flight.labels(backend).inc()
        attempts.labels(backend, "completed").inc()
        in_flight.labels(backend).dec()
        active.dec()
        requests.labels(record.path, backend, str(record.status), record.cache).inc()
        durations.labels(backend).observe(0.01)
        ttfts.labels(backend).observe(record.ttft() or 0.0)
        chunks.labels(backend).inc(record.chunks)
        bytes_out.labels(backend).inc(record.bytes_out)
        bytes_in.inc(record.bytes_in)

    return one


def measure(mode: str) -> float:
    """Best of five: microseconds of CPU per request."""
    one = _with_tallies() if mode == "tallies" else _with_library()
    records = [_record() for _ in range(1000)]
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for index in range(REQUESTS):
            one(records[index % 1000])
        best = min(best, (time.process_time() - started) / REQUESTS * 1e6)
    return best


def main() -> None:
    if len(sys.argv) == 2:  # one mode, in its own process
        print(f"{measure(sys.argv[1]):.2f}")
        return
    for mode in MODES:
        env = dict(os.environ)
        with tempfile.TemporaryDirectory() as directory:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = directory
            command = [sys.executable, "-m", "bench.metrics_cost", mode]
            output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        print(f"{mode:>12}: {output.stdout.strip()} µs of CPU per request")


if __name__ == "__main__":
    main()
