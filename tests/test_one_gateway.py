"""`ntonix serve --workers 2` observed as one gateway: /metrics, /ntonix/status and the
dashboard's feed, whichever worker answers, equal the sum of what both workers did.

Which worker holds a connection is read from the kernel (/proc): the worker process whose
descriptors include the gateway's end of that TCP connection.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from tests.conftest import StartMock
from tests.support import Spawn, chat, serve_two_workers, workers_of

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# Connections per round: more rounds until both workers have served some.
ROUND = 6
SLOW_STREAM = {"x-mock-tokens": "400", "x-mock-token-delay": "0.02"}


def _config(tmp_path: Path, backend_url: str) -> Path:
    path = tmp_path / "ntonix.toml"
    path.write_text(f'[log]\naccess_log = "off"\n[[backends]]\nname = "m"\nurl = "{backend_url}"\n')
    return path


def _gateway_end_inode(gateway_port: int, client_port: int) -> str:
    """The socket inode of the gateway's end of the connection from `client_port`."""
    wanted = (f"0100007F:{gateway_port:04X}", f"0100007F:{client_port:04X}")
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == wanted:
            return fields[9]
    raise AssertionError(f"no connection from port {client_port} in /proc/net/tcp")


def worker_holding(workers: list[int], gateway_port: int, client_port: int) -> int:
    target = f"socket:[{_gateway_end_inode(gateway_port, client_port)}]"
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == target:
                    return pid
            except FileNotFoundError:  # closed meanwhile
                continue
    raise AssertionError(f"no worker holds the connection from port {client_port}")


def _client_port(response: httpx.Response) -> int:
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


def _samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _counted(samples: Samples) -> Samples:
    """Counters and histograms: what must add up exactly and stand still once traffic stops."""
    return {
        key: value
        for key, value in samples.items()
        if key[0].endswith(("_total", "_bucket", "_count", "_sum"))
    }


def _total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, pairs), value in samples.items()
        if sample == name and labels.items() <= dict(pairs).items()
    )


class OneConnection:
    """A client that keeps to one keep-alive connection, and knows which worker holds it."""

    def __init__(self, url: str) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self.client = httpx.AsyncClient(base_url=url, limits=limits, timeout=10)
        self.responses: list[httpx.Response] = []

    async def post(self, payload: dict[str, Any]) -> httpx.Response:
        response = await self.client.post("/v1/chat/completions", json=payload)
        self.responses.append(response)
        return response


async def _fresh_get(url: str, path: str, workers: list[int], port: int) -> tuple[int, str]:
    """GET `path` on a new connection: the worker that answered, and the body."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.get(path)
        assert response.status_code == 200
        return worker_holding(workers, port, _client_port(response)), response.text


async def test_two_workers_report_the_sum_of_what_both_did_whichever_answers(
    tmp_path: Path, start_mock: StartMock, spawn_job: Spawn
) -> None:
    mock = await start_mock()
    gateway, port = await serve_two_workers(spawn_job, _config(tmp_path, mock.url))
    url = f"http://127.0.0.1:{port}"
    workers = workers_of(gateway.pid)
    assert len(workers) == 2
    # A known sequence on each connection: a miss, its hit (same connection, same worker's
    # cache), a sampled stream (bypass), a malformed body (400).
    served: Counter[int] = Counter()
    connections: list[OneConnection] = []
    with trio.fail_after(60):
        while min(served[pid] for pid in workers) < 2:
            batch = [OneConnection(url) for _ in range(ROUND)]
            async with trio.open_nursery() as nursery:  # open at once: both workers accept
                for index, connection in enumerate(batch, start=len(connections)):
                    nursery.start_soon(connection.post, chat(f"q{index}", stream=False))
            for index, connection in enumerate(batch, start=len(connections)):
                first = connection.responses[0]
                served[worker_holding(workers, port, _client_port(first))] += 1
                assert (await connection.post(chat(f"q{index}", stream=False))).headers[
                    "x-ntonix-cache"
                ] == "hit"
                await connection.post(chat(f"s{index}", temperature=0.7))
                bad = await connection.client.post(
                    "/v1/chat/completions", content=b"{oops", headers={"content-type": "x/y"}
                )
                assert bad.status_code == 400
                connection.responses.append(bad)
                await connection.client.aclose()
            connections += batch
    responses = [response for connection in connections for response in connection.responses]
    count = len(connections)
    assert [r.headers.get("x-ntonix-cache") for r in responses].count("miss") == count
    body_bytes = sum(len(response.content) for response in responses)
    request_bytes = sum(len(response.request.content) for response in responses)

    scrapes = [
        _samples(text) for text in await _until_both_answered(url, "/metrics", workers, port)
    ]
    first = scrapes[0]
    assert all(_counted(scrape) == _counted(first) for scrape in scrapes)
    assert first[("ntonix_workers", ())] == 2
    assert _total(first, "ntonix_requests_total") == 4 * count
    assert _total(first, "ntonix_requests_total", cache="miss", status="200") == count
    assert _total(first, "ntonix_requests_total", cache="hit", status="200") == count
    assert _total(first, "ntonix_requests_total", cache="bypass", status="200") == count
    assert _total(first, "ntonix_requests_total", cache="bypass", status="400") == count
    assert _total(first, "ntonix_request_duration_seconds_count") == 4 * count
    assert _total(first, "ntonix_upstream_attempts_total", outcome="completed") == 2 * count
    assert mock.stats["requests"] == 2 * count
    assert _total(first, "ntonix_response_bytes_total") == body_bytes
    assert _total(first, "ntonix_request_bytes_total") == request_bytes
    assert first[("ntonix_cache_hits_total", ())] == count
    assert first[("ntonix_cache_misses_total", ())] == count
    assert first[("ntonix_cache_stored_total", ())] == count
    assert first[("ntonix_cache_entries", ())] == count  # each worker holds its own misses
    assert first[("ntonix_active_requests", ())] == 0

    # In flight: slow streams held open until each worker has some; all count, whoever is asked.
    async with trio.open_nursery() as nursery:
        release = trio.Event()
        holding = await _hold_slow_streams_on_both(nursery, url, workers, port, release)
        asked = await _until_both_answered(url, "/ntonix/status", workers, port)
        scraped = await _until_both_answered(url, "/metrics", workers, port)
        fed = await _until_both_fed(port, workers)
        release.set()
    streams = holding.total()
    for status in map(json.loads, asked):
        assert status["workers"] == 2
        (backend,) = status["backends"]
        assert backend["active_requests"] == streams
        assert status["cache"]["hits"] == count and status["cache"]["misses"] == count
    for samples in map(_samples, scraped):
        assert samples[("ntonix_active_requests", ())] == streams
        assert samples[("ntonix_backend_in_flight_requests", (("backend", "m"),))] == streams
    for snapshot in fed:
        assert snapshot["workers"] == 2
        assert snapshot["backends"][0]["active_requests"] == streams
        assert snapshot["rates"]["active_requests"] == streams
        assert snapshot["cache"]["hits"] == count
        # The last minute's finished requests, second by second, from both workers' windows.
        assert sum(second["requests"] for second in snapshot["series"]) == 4 * count
    assert await gateway.stop() == 0
    assert b"Traceback" not in gateway.output


async def _hold_slow_streams_on_both(
    nursery: trio.Nursery, url: str, workers: list[int], port: int, release: trio.Event
) -> Counter[int]:
    """Open slow streams, each on a new connection, until both workers hold one; they stay
    open until `release` is set. How many each worker (by pid) holds."""

    async def hold_stream(index: int, task_status: trio.TaskStatus[int]) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            payload = chat(f"slow{index}", temperature=0.7)
            async with client.stream(
                "POST", "/v1/chat/completions", json=payload, headers=SLOW_STREAM
            ) as response:
                # Held here: a dropped iterator would be closed, and the stream with it.
                chunks = response.aiter_raw()
                await anext(chunks)
                task_status.started(worker_holding(workers, port, _client_port(response)))
                await release.wait()

    holding: Counter[int] = Counter()
    with trio.fail_after(30):
        while len(holding) < 2:
            holding[await nursery.start(hold_stream, len(holding))] += 1
    return holding


async def _until_both_answered(url: str, path: str, workers: list[int], port: int) -> list[str]:
    """GET `path` on new connections until each worker has answered twice; the bodies."""
    bodies: list[str] = []
    answered: Counter[int] = Counter()
    with trio.fail_after(60):
        while min(answered[pid] for pid in workers) < 2:
            pid, text = await _fresh_get(url, path, workers, port)
            answered[pid] += 1
            bodies.append(text)
    return bodies


async def _until_both_fed(port: int, workers: list[int]) -> list[dict[str, Any]]:
    """The dashboard's first snapshot, on new connections until each worker has sent two."""
    snapshots: list[dict[str, Any]] = []
    answered: Counter[int] = Counter()
    with trio.fail_after(60):
        while min(answered[pid] for pid in workers) < 2:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ntonix/dashboard/ws") as feed:
                snapshots.append(json.loads(await feed.get_message()))
                answered[worker_holding(workers, port, feed.local.port)] += 1
    return snapshots


async def test_two_workers_show_the_engines_reading_once_with_the_answering_workers_score(
    tmp_path: Path, start_mock: StartMock, spawn_job: Spawn
) -> None:
    mock = await start_mock("m", slots=16, engine="vllm")
    config = tmp_path / "ntonix.toml"
    config.write_text(
        '[log]\naccess_log = "off"\n[balancer]\nstrategy = "least-loaded"\n'
        "[health]\nload_interval = 0.25\n"
        f'[[backends]]\nname = "m"\nurl = "{mock.url}"\n'
    )
    gateway, port = await serve_two_workers(spawn_job, config)
    url = f"http://127.0.0.1:{port}"
    workers = workers_of(gateway.pid)
    async with trio.open_nursery() as nursery:
        release = trio.Event()
        holding = await _hold_slow_streams_on_both(nursery, url, workers, port, release)
        streams = holding.total()
        loads = await _until_both_read(url, workers, port, streams)
        scraped = await _until_both_answered(url, "/metrics", workers, port)
        release.set()
    for load in loads:
        # The engine's queue, read by both workers: shown once, not summed over them.
        assert load["engine"] == "vllm" and not load["stale"]
        assert load["reading"]["running"] == streams and load["reading"]["waiting"] == 0
        # The answering worker's estimate (its own reading brought up to now with its own
        # requests) reached the engine-wide count, not its share of it.
        assert load["estimated_load"] == streams
        assert load["score"] is not None and load["slow_start"] == 1.0
    for samples in map(_samples, scraped):
        assert samples[("ntonix_workers", ())] == 2
        assert samples[("ntonix_backend_engine_running", (("backend", "m"),))] == streams
        assert ("ntonix_backend_load_score", (("backend", "m"),)) in samples
    assert await gateway.stop() == 0
    assert b"Traceback" not in gateway.output


async def _until_both_read(
    url: str, workers: list[int], port: int, running: int
) -> list[dict[str, Any]]:
    """/ntonix/status's load of backend m on new connections, until each worker has answered
    twice with a reading of `running` requests and its own estimate there too (a worker's own
    reading may be up to a load interval older than the freshest, which the status shows)."""
    loads: list[dict[str, Any]] = []
    answered: Counter[int] = Counter()
    with trio.fail_after(60):
        while min(answered[pid] for pid in workers) < 2:
            pid, text = await _fresh_get(url, "/ntonix/status", workers, port)
            status = json.loads(text)
            assert status["workers"] == 2
            (backend,) = status["backends"]
            load = backend["load"]
            # Never the sum of the workers' views: each sees the one engine.
            assert load["estimated_load"] is None or load["estimated_load"] <= running
            reading = load.get("reading") or {}
            if reading.get("running") == running and load["estimated_load"] == running:
                answered[pid] += 1
                loads.append(load)
    return loads
