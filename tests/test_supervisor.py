"""`ntonix serve --workers 2` keeps its workers: one SIGKILLed is replaced within a second while
the other serves on; one that keeps dying is backed off, then the gateway exits with a clear
message (issue 16, fault 8)."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import httpx
import trio

from tests.conftest import RunningMock, StartMock
from tests.support import SERVE, Spawn, chat, serve_two_workers, serving, workers_of


def _config_file(tmp_path: Path, mock: RunningMock) -> Path:
    path = tmp_path / "ntonix.toml"
    path.write_text(f'[cache]\nenabled = false\n[[backends]]\nname = "m"\nurl = "{mock.url}"\n')
    return path


async def _new_worker(parent: int, known: set[int], timeout: float) -> int:
    with trio.fail_after(timeout):
        while not (new := set(workers_of(parent)) - known):
            await trio.sleep(0.005)
    return new.pop()


async def test_a_killed_worker_is_replaced_within_a_second_while_the_other_serves(
    tmp_path: Path, start_mock: StartMock, spawn_job: Spawn
) -> None:
    mock = await start_mock()
    gateway, port = await serve_two_workers(spawn_job, _config_file(tmp_path, mock))
    victim, survivor = workers_of(gateway.pid)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=10) as client:
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replacement = await _new_worker(gateway.pid, {victim, survivor}, timeout=1.0)
        assert time.monotonic() - killed < 1.0
        # Meanwhile and after, fresh connections reach a live worker: none is lost.
        for _ in range(20):
            response = await client.post(
                url, json=chat(stream=False), headers={"connection": "close"}
            )
            statuses.append(response.status_code)
    assert statuses == [200] * 20
    await gateway.wait_for(
        rb"ntonix-worker-\d died \(exit code -9\) after [\d.]+ s: replaced in 0 s"
    )
    with trio.fail_after(30):  # the replacement imports, then serves
        while gateway.output.count(b"Running on") < 3:
            await trio.sleep(0.01)
    assert set(workers_of(gateway.pid)) == {survivor, replacement}
    assert await gateway.stop(signal.SIGTERM) == 0
    assert b"Traceback" not in gateway.output


async def test_a_worker_that_keeps_dying_is_backed_off_then_the_gateway_exits_1(
    tmp_path: Path, start_mock: StartMock, spawn_job: Spawn
) -> None:
    mock = await start_mock()
    gateway, _ = await serve_two_workers(spawn_job, _config_file(tmp_path, mock))
    victim, survivor = workers_of(gateway.pid)
    known = {victim, survivor}
    kills = [time.monotonic()]
    os.kill(victim, signal.SIGKILL)
    for _ in range(4):  # each replacement dies at once: 5 deaths in a row
        worker = await _new_worker(gateway.pid, known, timeout=10)
        known.add(worker)
        kills.append(time.monotonic())
        os.kill(worker, signal.SIGKILL)
    with trio.fail_after(20):
        assert await gateway.process.wait() == 1
    gaps = [later - earlier for earlier, later in itertools.pairwise(kills)]
    # Back-off: 0, then 0.5, 1, 2 s before each replacement (plus the time to spawn one).
    assert gaps[1] >= 0.5 and gaps[2] >= 1.0 and gaps[3] >= 2.0, gaps
    assert b"died 5 times in a row" in gateway.output
    assert b"not replacing it again; the gateway stops" in gateway.output
    with trio.fail_after(5):
        while True:
            try:
                os.kill(survivor, 0)
            except ProcessLookupError:
                break
            await trio.sleep(0.05)


async def test_a_sigkilled_parent_leaves_its_figures_directory_to_the_next_start(
    tmp_path: Path, start_mock: StartMock, spawn_job: Spawn
) -> None:
    mock = await start_mock()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    command = (*SERVE, "--config", str(_config_file(tmp_path, mock)), "--workers", "2")
    gateway = await spawn_job(*command, env={"TMPDIR": str(temporary)})
    await serving(gateway, 2)
    (left,) = temporary.glob("ntonix-workers-*")
    assert (left / "owner.pid").read_text() == f"{gateway.pid}\n"

    os.kill(gateway.pid, signal.SIGKILL)
    await gateway.process.wait()
    assert left.exists()  # the parent had no chance to remove it

    again = await spawn_job(*command, env={"TMPDIR": str(temporary)})
    await serving(again, 2)
    assert not left.exists()
    assert f"removed {left}".encode() in again.output
    assert await again.stop(signal.SIGTERM) == 0, again.output.decode()
    assert list(temporary.iterdir()) == []
