"""What one stream, one chunk and one request cost the gateway in Trio's currency:
`python -m bench.counts [--streams N] [--requests N]`.

CPU time on this shared machine is noisy; these counts are not. One process runs the gateway
(`ntonix.server.serve`, one worker, in the main thread's Trio run) in front of a lean mock (a
subprocess), and drives it from a second thread with a Trio run of its own (`bench.load`), so
that the Instrument and the counters below see the gateway's run only:
- tasks spawned, task steps (each time the scheduler runs a task: a wake-up), cancel scopes
  entered, deadline changes (Trio's deadline heap: `Deadlines.add` / `remove`).
Per stream: N streams of 1 token, divided by N (first on a cold upstream pool, each stream opening
its upstream connection, then again reusing them). Per chunk: N streams of 11 tokens spaced 50 ms
apart (so no two arrive together), minus the 1-token figure, divided by 10 N. Per request: N
non-streaming requests on keep-alive connections. Prints one JSON object.

Invariant: the gateway is the same code `ntonix serve --workers 1` runs; only counting is added.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from functools import partial
from typing import Any

import trio
import trio._core._run as trio_run

from bench.load import LoadSpec, raise_open_file_limit, run_requests, run_streams
from bench.scenarios import CHAT_BODY, STREAM_BODY
from ntonix.config import Config
from ntonix.server import serve

COUNTS: Counter[str] = Counter()
_GATEWAY_THREAD: list[int] = []


class _Counting(trio.abc.Instrument):
    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        COUNTS["tasks"] += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        COUNTS["steps"] += 1


def _counted(name: str, method: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() in _GATEWAY_THREAD:
            COUNTS[name] += 1
        return method(*args, **kwargs)

    return wrapper


def _install_counters() -> None:
    trio_run.Deadlines.add = _counted("deadline_changes", trio_run.Deadlines.add)  # type: ignore[method-assign]
    trio_run.Deadlines.remove = _counted("deadline_changes", trio_run.Deadlines.remove)  # type: ignore[method-assign]
    trio_run.CancelScope.__enter__ = _counted("cancel_scopes", trio_run.CancelScope.__enter__)  # type: ignore[method-assign]


def _start_mock() -> tuple[subprocess.Popen[bytes], str]:
    argv = [sys.executable, "-m", "mocks.llm", "--port", "0", "--lean", "--name", "m"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    return process, "http://" + line.strip().rpartition("http://")[2]


def _load(spec: LoadSpec, streams: bool) -> dict[str, Any]:
    result = trio.run(run_streams if streams else run_requests, spec)
    if streams:
        return {"ok": sum(s.ok for s in result.streams), "n": len(result.streams)}
    return {"ok": result.completed, "errors": result.errors}


async def _main(args: argparse.Namespace, mock_url: str) -> dict[str, Any]:
    config = Config.from_mapping(
        {
            "gateway": {"graceful_timeout": 1.0, "max_connections_per_client": 0},
            "cache": {"enabled": False},
            "backends": [{"name": "m", "url": mock_url}],
        }
    )
    stop = trio.Event()
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            partial(serve, config, ["127.0.0.1:0"], shutdown_trigger=stop.wait)
        )
        port = int(urls[0].rpartition(":")[2])
        target = [("127.0.0.1", port)]

        async def measure(name: str, spec: LoadSpec, streams: bool) -> None:
            await trio.sleep(0.3)  # the gateway's probes settle
            before = COUNTS.copy()
            cpu = time.process_time()
            outcome = await trio.to_thread.run_sync(_load, spec, streams)
            delta = COUNTS - before
            results[name] = {**outcome, **dict(delta), "process_cpu": time.process_time() - cpu}

        def stream_spec(tokens: int, delay: float) -> LoadSpec:
            headers = {"x-mock-tokens": str(tokens), "x-mock-ttft": "0.05"}
            headers["x-mock-token-delay"] = str(delay)
            return LoadSpec("streams", target, args.streams, STREAM_BODY, 0.0, headers=headers)

        await measure("warmup", stream_spec(1, 0.0), True)
        await measure("stream_1", stream_spec(1, 0.0), True)
        await measure("stream_11", stream_spec(11, 0.05), True)
        quick = {"x-mock-tokens": "8", "x-mock-ttft": "0", "x-mock-token-delay": "0"}
        requests = LoadSpec(
            "requests", target, 8, CHAT_BODY, 0.0, headers=quick, duration=args.seconds
        )
        await measure("requests", requests, False)
        stop.set()
    return results


def per_unit(results: dict[str, Any], streams: int) -> dict[str, dict[str, float]]:
    keys = ("tasks", "steps", "cancel_scopes", "deadline_changes")
    one, eleven, reqs = results["stream_1"], results["stream_11"], results["requests"]
    cold = results["warmup"]
    return {
        "per stream, new upstream connection": {k: cold.get(k, 0) / streams for k in keys},
        "per stream": {k: one.get(k, 0) / streams for k in keys},
        "per chunk": {k: (eleven.get(k, 0) - one.get(k, 0)) / (10 * streams) for k in keys},
        "per request": {k: reqs.get(k, 0) / max(reqs["ok"], 1) for k in keys},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.counts", description=__doc__)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.0, help="of non-streaming requests")
    args = parser.parse_args(argv)
    raise_open_file_limit()
    _install_counters()
    _GATEWAY_THREAD.append(threading.get_ident())
    mock, url = _start_mock()
    try:
        results = trio.run(partial(_main, args, url), instruments=[_Counting()])
    finally:
        mock.terminate()
        mock.wait(10)
    print(json.dumps({"raw": results, **per_unit(results, args.streams)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
