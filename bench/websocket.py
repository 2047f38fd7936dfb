"""`python -m bench.websocket [--sessions 1000] [--round-trips 2000] [--seconds 5]`

WebSocket sessions through the gateway, against a mock on Hypercorn (the lean mock has no
WebSocket) and one gateway worker:
- round trip: one session sends a 64-byte binary message and waits for its echo, again and
  again; p50/p99 straight at the mock and through the gateway;
- relay: 32 sessions each keep one message in flight for `--seconds`; echoes per second;
- idle sessions: `--sessions` sessions opened and left idle; the gateway's RSS before and
  after, per session.
Prints a Markdown table; logs go to a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from bench.load import raise_open_file_limit
from bench.procs import Processes, gateway_config, memory_kib, start_gateway, start_mock
from bench.stats import percentile

MODEL = "mock-llm"
PAYLOAD = bytes(64)
RELAY_SESSIONS = 32


def _ws(url: str) -> str:
    return url.replace("http://", "ws://", 1) + f"/v1/realtime?model={MODEL}"


async def _opened(ws: WebSocketConnection) -> None:
    await ws.get_message()  # session.created


async def round_trips(url: str, count: int) -> list[float]:
    """Seconds per echo of a 64-byte binary message, one at a time on one session."""
    samples = []
    async with open_websocket_url(_ws(url)) as ws:
        await _opened(ws)
        for _ in range(count):
            started = time.perf_counter()
            await ws.send_message(PAYLOAD)
            await ws.get_message()
            samples.append(time.perf_counter() - started)
    return samples


async def relay_rate(url: str, seconds: float) -> float:
    """Echoes per second over RELAY_SESSIONS sessions, each with one message in flight."""
    echoes = 0

    async def session() -> None:
        nonlocal echoes
        async with open_websocket_url(_ws(url)) as ws:
            await _opened(ws)
            with trio.move_on_after(seconds):
                while True:
                    await ws.send_message(PAYLOAD)
                    await ws.get_message()
                    echoes += 1

    async with trio.open_nursery() as nursery:
        for _ in range(RELAY_SESSIONS):
            nursery.start_soon(session)
    return echoes / seconds


async def idle_sessions(url: str, count: int, gateway_pid: int) -> tuple[int, int]:
    """The gateway's RSS (KiB) before and with `count` idle sessions open."""
    before = memory_kib(gateway_pid)["VmRSS"]
    opened = 0
    all_open = trio.Event()
    done = trio.Event()

    # Handshakes 50 at a time: a burst of 1,000 would queue longer than upstream_connect_timeout
    # on this 2-core machine, and the gateway would count that against the mock.
    handshakes = trio.CapacityLimiter(50)

    async def session() -> None:
        nonlocal opened
        async with contextlib.AsyncExitStack() as stack:
            async with handshakes:
                ws = await stack.enter_async_context(open_websocket_url(_ws(url)))
                await _opened(ws)
            opened += 1
            if opened == count:
                all_open.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(session)
        await all_open.wait()
        await trio.sleep(1.0)  # let the gateway settle
        during = memory_kib(gateway_pid)["VmRSS"]
        done.set()
    return before, during


async def run(args: argparse.Namespace, gateway: str, mock: str, gateway_pid: int) -> None:
    rows = []
    for target, url in (("direct", mock), ("gateway", gateway)):
        await round_trips(url, 200)  # warm up
        samples = await round_trips(url, args.round_trips)
        rate = await relay_rate(url, args.seconds)
        p50, p99 = percentile(samples, 0.5) * 1e3, percentile(samples, 0.99) * 1e3
        rows.append(f"| {target} | {p50:.3f} | {p99:.3f} | {rate:,.0f} |")
    before, during = await idle_sessions(gateway, args.sessions, gateway_pid)
    print("| target | round trip p50 (ms) | round trip p99 (ms) | echoes/s, 32 sessions |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))
    per_session = (during - before) / args.sessions
    print(
        f"\n{args.sessions} idle sessions through one gateway worker: RSS {before / 1024:.1f} MiB"
        f" -> {during / 1024:.1f} MiB, {per_session:.1f} KiB per session"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.websocket", description=__doc__)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    raise_open_file_limit()
    with tempfile.TemporaryDirectory() as logs, Processes(Path(logs)) as processes:
        options = ["--tokens", "1", "--ttft", "0", "--token-delay", "0"]
        mock = start_mock(processes, "ws", options, lean=False)
        config = Path(logs) / "ntonix.toml"
        config.write_text(gateway_config([mock]) + '\n[log]\naccess_log = "off"\n')
        gateway = start_gateway(processes, config, workers=1)
        trio.run(run, args, gateway.url, mock.url, gateway.process.pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
