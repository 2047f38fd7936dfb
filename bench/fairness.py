"""`python -m bench.fairness [--quick]`: how long one key waits behind another key's backlog.

Two lean mocks (`max_concurrent = 2` each: 4 slots in all) serve slow streams (`--tokens`
tokens, `--delay` s apart, after a 10 ms TTFT) behind a fresh `ntonix serve` (one worker, its
own process). Key A sends `--backlog` streams at once; once the gateway has them all (4 on
the slots, the rest queued: its status says so), key B sends one every `--every` s, `--count`
in all. Reported: B's time to first byte (request sent to the first body byte: its queue wait
plus the backend's 10 ms TTFT) p50 / p99 / max, and how many of A's streams ended meanwhile,
in three runs, each on a fresh gateway:

- `fifo`: no named keys, so both clients are one anonymous key: first come, first served, as
  the queue was before fair queuing;
- `fair`: A and B named, both interactive, weight 1;
- `batch`: A is a `batch` key (weight 1, `batch_aging` 60 s), B interactive.

B's streams must fit in its fair share for the fair figure to mean "one slot's turn": at the
defaults B keeps about 1.5 of the 4 slots busy (5 streams a second, 0.3 s each). A's streams
still running when B's last one has its first byte are cancelled (their clients leave).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import attrs
import httpx
import trio

from bench.procs import Mock, Processes, start_gateway, start_mock
from ntonix.core.telemetry import percentile

MODES = ("fifo", "fair", "batch")


@attrs.frozen
class Run:
    mode: str
    b_ttfb: tuple[float, ...]  # seconds, each of B's requests
    a_done: int  # A's requests answered while B was sending
    seconds: float


def config(mode: str, mocks: list[Mock]) -> str:
    """The gateway's TOML for one mode."""
    lines = [
        "[gateway]",
        "queue_timeout = 3600.0",
        "batch_aging = 60.0",
        "graceful_timeout = 1.0",
        "max_connections_per_client = 0  # every client of the bench is 127.0.0.1",
        "[cache]",
        "enabled = false",
        "[log]",
        'access_log = "off"',
    ]
    for mock in mocks:
        lines += ["[[backends]]", f'name = "{mock.name}"', f'url = "{mock.url}"']
        lines += ["max_concurrent = 2"]
    if mode != "fifo":
        priority = "batch" if mode == "batch" else "interactive"
        lines += ["[[auth.keys]]", 'name = "a"', 'key = "sk-a"', f'priority = "{priority}"']
        lines += ["[[auth.keys]]", 'name = "b"', 'key = "sk-b"']
    return "\n".join(lines) + "\n"


@attrs.define
class Answered:
    a: int = 0  # A's requests answered in full


async def one_request(
    client: httpx.AsyncClient, url: str, key: str, ttfbs: list[float] | None, answered: Answered
) -> None:
    body = {"model": "mock-llm", "messages": [{"role": "user", "content": key}], "stream": True}
    headers = {"authorization": f"Bearer sk-{key}"}
    started = time.monotonic()
    async with client.stream("POST", url, json=body, headers=headers) as response:
        async for _ in response.aiter_raw():
            if ttfbs is not None:
                ttfbs.append(time.monotonic() - started)
                ttfbs = None
    if key == "a":
        answered.a += 1


async def run(mode: str, url: str, args: argparse.Namespace) -> Run:
    """Drive A's backlog and B's trickle at a gateway; B's TTFBs, sorted."""
    answered = Answered()
    b_ttfbs: list[float] = []
    # A new connection per request: none is reused just as the server's keep-alive timer
    # closes it, and B's figures include no wait for a pooled connection.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(timeout=None, limits=limits) as client,
        trio.open_nursery() as backlog,
    ):
        for _ in range(args.backlog):
            backlog.start_soon(one_request, client, url, "a", None, answered)
        status = url.replace("/v1/chat/completions", "/ntonix/status")
        await all_queued(client, status, args, answered)
        started = time.monotonic()
        async with trio.open_nursery() as b_side:
            for _ in range(args.count):
                b_side.start_soon(one_request, client, url, "b", b_ttfbs, answered)
                await trio.sleep(args.every)
        seconds = time.monotonic() - started
        a_done = answered.a
        backlog.cancel_scope.cancel()
    return Run(mode, tuple(sorted(b_ttfbs)), a_done, seconds)


async def all_queued(
    client: httpx.AsyncClient, status: str, args: argparse.Namespace, answered: Answered
) -> None:
    """Until the gateway took A's burst in: each of A's streams queued, on a slot, or done."""
    with trio.fail_after(60):
        while True:
            queued: int = (await client.get(status)).json()["queued"]
            if queued + answered.a >= args.backlog - 4:
                return
            await trio.sleep(0.05)  # another process's state: nothing here to wait on


def run_mode(mode: str, args: argparse.Namespace, logs: Path) -> Run:
    options = ["--tokens", str(args.tokens), "--token-delay", str(args.delay), "--ttft", "0.01"]
    with Processes(logs) as processes:
        mocks = [start_mock(processes, f"{mode}-mock-{n}", options) for n in range(2)]
        path = logs / f"{mode}.toml"
        path.write_text(config(mode, mocks))
        gateway = start_gateway(processes, path, workers=1)
        return trio.run(run, mode, f"{gateway.url}/v1/chat/completions", args)


def table(runs: list[Run], args: argparse.Namespace) -> str:
    lines = [
        f"A: {args.backlog} streams at once; B: {args.count} streams, one every {args.every} s; "
        f"each stream {args.tokens} tokens {args.delay} s apart; 4 slots; one gateway worker",
        "",
        "| queue | B's TTFB p50 | B's TTFB p99 | B's TTFB max | A answered meanwhile | B's run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        p50, p99 = percentile(list(r.b_ttfb), 0.5), percentile(list(r.b_ttfb), 0.99)
        lines.append(
            f"| {r.mode} | {_ms(p50)} | {_ms(p99)} | {_ms(max(r.b_ttfb))} | {r.a_done} "
            f"| {r.seconds:.1f} s |"
        )
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=400)
    parser.add_argument("--every", type=float, default=0.2)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--only", default=",".join(MODES))
    parser.add_argument("--quick", action="store_true", help="backlog 100, 20 of B's")
    args = parser.parse_args()
    if args.quick:
        args.backlog, args.count = 100, 20
    with tempfile.TemporaryDirectory(prefix="ntonix-fairness-") as logs:
        runs = [run_mode(mode, args, Path(logs)) for mode in args.only.split(",")]
    print(table(runs, args))


if __name__ == "__main__":
    main()
