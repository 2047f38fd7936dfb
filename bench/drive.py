"""Running the load generator as several processes and merging what they report.

One Python process tops out well below what the mocks can serve, so the load is split over
processes that share one wall-clock `start_at` and report JSON, merged here.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.load import LoadSpec, StreamRecord
from bench.procs import Processes, python_argv

# Time for the load processes to start Python and import Trio before `start_at`.
STARTUP_LEAD = 1.0


@dataclass
class RequestsLoad:
    completed: int
    errors: int
    latencies: list[float]
    window: float
    cpu: float  # CPU seconds of all load processes over the window
    error_samples: list[str]

    @property
    def rate(self) -> float:
        return self.completed / self.window if self.window else 0.0


@dataclass
class StreamsLoad:
    streams: list[StreamRecord]
    elapsed: float
    cpu: float  # CPU seconds of all load processes
    errors: dict[str, int] = field(default_factory=dict)  # message -> count


def _split(spec: LoadSpec, processes: int, start_at: float) -> list[LoadSpec]:
    """`processes` specs that together open `spec.connections`, each over all targets."""
    count = min(processes, spec.connections)
    parts = []
    for index in range(count):
        share = spec.connections // count + (1 if index < spec.connections % count else 0)
        # Rotate the targets so that the first connection of each process lands elsewhere.
        targets = (
            spec.targets[index % len(spec.targets) :] + spec.targets[: index % len(spec.targets)]
        )
        parts.append(
            dataclasses.replace(
                spec,
                connections=share,
                targets=targets,
                start_at=start_at,
                id_prefix=f"{spec.id_prefix}-p{index}",
            )
        )
    return parts


def run_load(
    processes: Processes,
    spec: LoadSpec,
    load_processes: int,
    *,
    on_start: Callable[[], None] | None = None,
    every: Callable[[], None] | None = None,
    tick: float = 0.25,
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """Run `spec` split over `load_processes` processes; their JSON results, one per process.

    `on_start` runs at `start_at`; `every` runs each `tick` seconds while the load runs.
    """
    start_at = time.time() + STARTUP_LEAD
    outputs = []
    running = []
    for index, part in enumerate(_split(spec, load_processes, start_at)):
        # Results go to a file, not a pipe: a pipe would fill up and block the process.
        output = processes.log_dir / f"load-{spec.id_prefix}-{index}.json"
        with output.open("wb") as sink:
            argv = python_argv("bench.load", json.dumps(dataclasses.asdict(part)))
            running.append(processes.start(f"load-{spec.id_prefix}-{index}", argv, stdout=sink))
        outputs.append(output)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        if on_start is not None:
            on_start()
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in running):
            if time.monotonic() > deadline:
                raise RuntimeError(f"load {spec.id_prefix} still running after {timeout:g} s")
            if every is not None:
                every()
            time.sleep(tick)
        if any(p.returncode != 0 for p in running):
            raise RuntimeError(f"a load process of {spec.id_prefix} failed; see its log")
        return [json.loads(output.read_text()) for output in outputs]
    finally:
        for process in running:
            processes.stop(process)


def run_requests(
    processes: Processes,
    spec: LoadSpec,
    load_processes: int,
    *,
    on_start: Callable[[], None] | None = None,
    every: Callable[[], None] | None = None,
) -> RequestsLoad:
    timeout = spec.warmup + spec.duration + 30
    results = run_load(
        processes,
        spec,
        load_processes,
        on_start=on_start,
        every=every,
        tick=0.02,  # `every` opens and closes the CPU window: keep it close to the load's
        timeout=timeout,
    )
    return RequestsLoad(
        completed=sum(int(r["completed"]) for r in results),
        errors=sum(int(r["errors"]) for r in results),
        latencies=[x for r in results for x in r["latencies"]],
        window=spec.duration,
        cpu=sum(float(r["cpu"]) for r in results),
        error_samples=[x for r in results for x in r["error_samples"]],
    )


def run_streams(
    processes: Processes,
    spec: LoadSpec,
    load_processes: int,
    *,
    on_start: Callable[[], None] | None = None,
    every: Callable[[], None] | None = None,
) -> StreamsLoad:
    results = run_load(
        processes, spec, load_processes, on_start=on_start, every=every, timeout=spec.timeout + 30
    )
    streams = [StreamRecord(**s) for r in results for s in r["streams"]]
    errors: dict[str, int] = {}
    for stream in streams:
        if not stream.ok:
            errors[stream.error] = errors.get(stream.error, 0) + 1
    return StreamsLoad(
        streams=streams,
        elapsed=max(float(r["elapsed"]) for r in results),
        cpu=sum(float(r["cpu"]) for r in results),
        errors=errors,
    )
