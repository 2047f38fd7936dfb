"""`python -m bench.tier_bench [--quick] [--rounds N] [--lookup-hold S]`: what the shared tier
(Valkey) costs the gateway (`--lookup-hold`: the tier-on gateways' `[shared] lookup_hold`, to
compare a hold with none; without it, the default).

1. Hit latency. Gateway A (tier on) answers N distinct prompts, which stores each in its L1 and
   in Valkey. Gateway B (tier on, its L1 empty) then asks each prompt twice in a row on one
   keep-alive connection: the first answer is an L2 hit, the second an L1 hit of the same
   response. p50 of each, half the prompts streamed (16 tokens), half not.
2. CPU per request with the tier off and with it on but cold. M requests, each a prompt never
   asked before (so every lookup misses both levels and every answer is stored in both), over C
   keep-alive connections at once, through a gateway with the tier off, then one with it on,
   alternately for R rounds. The gateway's CPU (utime + stime from /proc) per request, split
   into its main thread (the event loop) and its other threads (valkey-glide's), and, with the
   tier on, the commands Valkey ran per request (`INFO commandstats`: EVALSHA is the lookup
   call; SET, GET and EXISTS run inside it; any other is a call of its own).

Valkey is a private valkey-server (the one `url = "embedded"` runs) on a unix socket; its own
CPU is reported apart. Every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.cache_bench import Answer, Connection
from bench.procs import CLOCK_TICKS, CpuMeter, Processes, start_gateway, start_mock
from bench.stats import percentile
from bench.wire import request_bytes
from ntonix.embedded import EmbeddedValkey

RESULTS = Path(__file__).resolve().parent / "results"
MOCK_OPTIONS = ["--tokens", "8", "--token-delay", "0", "--ttft", "0"]


@dataclass(frozen=True)
class Sizes:
    prompts: int = 400  # distinct prompts of the latency run
    requests: int = 2000  # per CPU run
    connections: int = 16
    rounds: int = 3
    lookup_hold: float | None = None  # the tier's [shared] lookup_hold; None: its default


QUICK = Sizes(prompts=100, requests=500, rounds=2)


def _log(message: str) -> None:
    print(f"[tier-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _config(mock_url: str, tier_url: str, lookup_hold: float | None = None) -> str:
    shared = f'[shared]\nurl = "{tier_url}"\n' if tier_url else ""
    if tier_url and lookup_hold is not None:
        shared += f"lookup_hold = {lookup_hold!r}\n"
    return (
        '[gateway]\ngraceful_timeout = 5.0\n[log]\naccess_log = "off"\n'
        f'{shared}[[backends]]\nname = "mock"\nurl = "{mock_url}"\n'
    )


def _wire(port: int, prompt: str, *, stream: bool) -> bytes:
    body = {
        "model": "mock-llm",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "stream": stream,
    }
    headers = {"content-type": "application/json", "x-mock-tokens": "16"}
    return request_bytes(
        "POST", "/v1/chat/completions", f"127.0.0.1:{port}", headers, json.dumps(body).encode()
    )


async def _ask_in_turn(port: int, requests: list[tuple[str, bool]]) -> list[Answer]:
    connection = Connection(("127.0.0.1", port))
    try:
        return [
            await connection.exchange(_wire(port, prompt, stream=stream), stream=stream)
            for prompt, stream in requests
        ]
    finally:
        connection.close()


async def _ask_at_once(port: int, prompts: list[str], connections: int) -> list[Answer]:
    answers: list[Answer] = []
    todo = iter(prompts)

    async def loop() -> None:
        connection = Connection(("127.0.0.1", port))
        try:
            for prompt in todo:
                answers.append(
                    await connection.exchange(_wire(port, prompt, stream=True), stream=True)
                )
        finally:
            connection.close()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(loop)
    return answers


def _thread_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of a process's main thread and of all its other threads."""
    main = others = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that ended
        seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        if int(task) == pid:
            main += seconds
        else:
            others += seconds
    return main, others


def _valkey(socket_path: str, *command: str) -> str:
    """One command to Valkey over its socket (RESP by hand: the bench needs no client); its
    simple or bulk string reply."""
    request = f"*{len(command)}\r\n" + "".join(f"${len(c)}\r\n{c}\r\n" for c in command)
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(socket_path)
        connection.sendall(request.encode())
        reply = b""
        while not _whole(reply):
            more = connection.recv(65536)
            if not more:
                raise OSError("Valkey closed the connection")
            reply += more
    head, _, rest = reply.partition(b"\r\n")
    return (rest[: int(head[1:])] if head.startswith(b"$") else head[1:]).decode()


def _whole(reply: bytes) -> bool:
    head, ended, rest = reply.partition(b"\r\n")
    return bool(ended) and (not head.startswith(b"$") or len(rest) >= int(head[1:]) + 2)


def _commands(socket_path: str) -> dict[str, int]:
    """Valkey's command counts since its last CONFIG RESETSTAT (without INFO's and CONFIG's)."""
    counts = {}
    for line in _valkey(socket_path, "INFO", "commandstats").splitlines():
        name, _, rest = line.partition(":")
        if name.startswith("cmdstat_") and not name.startswith(("cmdstat_info", "cmdstat_config")):
            counts[name.removeprefix("cmdstat_")] = int(rest.split(",")[0].removeprefix("calls="))
    return counts


def _check(answers: list[Answer], label: str | None, what: str) -> None:
    bad = [a for a in answers if not a.complete or (label is not None and a.label != label)]
    if bad:
        first = bad[0]
        raise RuntimeError(f"{what}: {len(bad)} bad answers, e.g. {first.status} {first.label}")


def hit_latency(processes: Processes, logs: Path, mock_url: str, tier: str, sizes: Sizes) -> dict:
    config = logs / "tier-on.toml"
    config.write_text(_config(mock_url, tier, sizes.lookup_hold))
    writer = start_gateway(processes, config, 1)
    reader = start_gateway(processes, config, 1)
    prompts = [(f"latency {n}", n % 2 == 0) for n in range(sizes.prompts)]
    _check(trio.run(_ask_in_turn, writer.port, prompts), "miss", "filling")
    time.sleep(0.5)  # the writer task stores in Valkey off the request path
    twice = [request for request in prompts for _ in range(2)]
    answers = trio.run(_ask_in_turn, reader.port, twice)
    _check(answers, None, "latency run")
    # A lookup past the tier's budget (50 ms) is a miss, not an error: such pairs are left out.
    pairs = [
        (answer_l2, answer_l1, stream)
        for answer_l2, answer_l1, (_, stream) in zip(
            answers[0::2], answers[1::2], prompts, strict=True
        )
        if answer_l2.label == "hit"
    ]
    _check([l1 for _, l1, _ in pairs], "hit", "L1 hits")
    for answer_l2, answer_l1, _ in pairs:
        if answer_l2.body != answer_l1.body:
            raise RuntimeError("an L2 hit differs from the L1 hit of the same prompt")
    processes.stop(writer.process)
    processes.stop(reader.process)
    result: dict[str, float] = {}
    for index, name in ((0, "l2"), (1, "l1")):
        for kind, streamed in (("stream", True), ("json", False)):
            chosen = [pair[index].latency for pair in pairs if pair[2] == streamed]
            result[f"{name}_{kind}_p50_ms"] = round(1000 * percentile(chosen, 0.5), 3)
    result["pairs"] = len(pairs)
    result["l2_not_hits"] = len(prompts) - len(pairs)
    return result


def cpu_per_request(
    processes: Processes, logs: Path, mock_url: str, valkey: EmbeddedValkey, sizes: Sizes
) -> dict:
    runs: dict[str, list[float]] = {"off": [], "on": []}
    threads: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}  # main, others
    commands: list[dict[str, int]] = []
    valkey_seconds = 0.0
    counter = itertools.count()
    for round_ in range(sizes.rounds):
        for name, url in (("off", ""), ("on", valkey.url)):
            config = logs / f"tier-{name}.toml"
            config.write_text(_config(mock_url, url, sizes.lookup_hold))
            gateway = start_gateway(processes, config, 1)
            warm = [f"warm {name} {round_} {n}" for n in range(200)]
            _check(trio.run(_ask_at_once, gateway.port, warm, sizes.connections), None, "warm")
            prompts = [f"cold {next(counter)}" for _ in range(sizes.requests)]
            _valkey(valkey.socket_path, "CONFIG", "RESETSTAT")
            meter = CpuMeter({"gateway": gateway.pids(), "valkey": [valkey.process.pid]})
            main_before, others_before = _thread_seconds(gateway.process.pid)
            meter.start()
            answers = trio.run(_ask_at_once, gateway.port, prompts, sizes.connections)
            meter.stop()
            main_after, others_after = _thread_seconds(gateway.process.pid)
            _check(answers, "miss", f"cold run, tier {name}")
            runs[name].append(1e6 * meter.seconds["gateway"] / len(answers))
            threads[name].append(
                (
                    1e6 * (main_after - main_before) / len(answers),
                    1e6 * (others_after - others_before) / len(answers),
                )
            )
            if name == "on":
                valkey_seconds += meter.seconds["valkey"]
                commands.append(_commands(valkey.socket_path))
            processes.stop(gateway.process)
            _log(
                f"round {round_ + 1}, tier {name}: {runs[name][-1]:.0f} µs CPU per request "
                f"(main thread {threads[name][-1][0]:.0f}, others {threads[name][-1][1]:.0f})"
            )

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    off, on = median(runs["off"]), median(runs["on"])
    pairs = [b / a - 1 for a, b in zip(runs["off"], runs["on"], strict=True)]
    total = sizes.rounds * sizes.requests
    return {
        "off_us_per_request": [round(v) for v in runs["off"]],
        "on_us_per_request": [round(v) for v in runs["on"]],
        "median_off_us": round(off),
        "median_on_us": round(on),
        "on_vs_off_percent": round(100 * (on / off - 1), 1),
        "median_of_pairs_percent": round(100 * median(pairs), 1),
        "main_thread_us": {n: round(median([t[0] for t in threads[n]])) for n in threads},
        "other_threads_us": {n: round(median([t[1] for t in threads[n]])) for n in threads},
        "valkey_us_per_request": round(1e6 * valkey_seconds / total, 1),
        "valkey_commands_per_request": {
            command: round(sum(c.get(command, 0) for c in commands) / total, 3)
            for command in sorted({command for c in commands for command in c})
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tier_bench")
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--rounds", type=int, help="CPU runs of each (3; --quick 2)")
    parser.add_argument(
        "--lookup-hold", type=float, help="[shared] lookup_hold of the tier-on gateways, seconds"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    if args.lookup_hold is not None:
        sizes = dataclasses.replace(sizes, lookup_hold=args.lookup_hold)
    logs = RESULTS / "logs-tier"
    logs.mkdir(parents=True, exist_ok=True)
    valkey = EmbeddedValkey.start(256 * 1024 * 1024)
    try:
        with Processes(logs) as processes:
            mock = start_mock(processes, "mock", MOCK_OPTIONS)
            _log("hit latency: L2 then L1 for each prompt")
            latency = hit_latency(processes, logs, mock.url, valkey.url, sizes)
            _log(f"latency: {latency}")
            _log("CPU per request, tier off vs on and cold")
            cpu = cpu_per_request(processes, logs, mock.url, valkey, sizes)
    finally:
        valkey.stop()
    report = {"sizes": sizes.__dict__, "latency": latency, "cpu": cpu}
    print(json.dumps(report, indent=1))
    (RESULTS / "tier.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
