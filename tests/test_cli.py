"""The commands as a user runs them: real processes, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from ntonix.cli import _parser
from tests.conftest import RunningMock, StartMock
from tests.support import RUNNING_ON, SERVE, Spawn, chat

PYTHON = sys.executable


def _config(tmp_path: Path, mock: RunningMock, **gateway: float) -> Path:
    lines = ["[gateway]", *(f"{key} = {value}" for key, value in gateway.items())]
    lines += ["[[backends]]", 'name = "m"', f'url = "{mock.url}"']
    path = tmp_path / "ntonix.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


HYPERCORN = [PYTHON, "-m", "hypercorn", "--worker-class", "trio", "--bind", "127.0.0.1:0"]


@pytest.mark.parametrize("command", ["serve", "hypercorn"])
async def test_shutdown_lets_streams_finish_then_exits_0(
    command: str, tmp_path: Path, start_mock: StartMock, spawn: Spawn
) -> None:
    mock = await start_mock(tokens=30, token_delay=0.1)
    config = _config(tmp_path, mock, graceful_timeout=30)
    if command == "serve":
        gateway = await spawn(*SERVE, "--config", str(config))
    else:
        gateway = await spawn(*HYPERCORN, "ntonix:app", env={"NTONIX_CONFIG": str(config)})
    url = (await gateway.wait_for(RUNNING_ON)).group(1).decode()
    codes: list[int] = []

    async def stop_gateway() -> None:
        codes.append(await gateway.stop(signal.SIGTERM, timeout=15))

    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=chat()) as response,
        trio.open_nursery() as stopping,
    ):
        body = response.aiter_raw()
        chunks = [await anext(body)]
        # The stream needs 3 s more: Hypercorn's own default graceful timeout would cut it.
        stopping.start_soon(stop_gateway)
        chunks += [chunk async for chunk in body]
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
    assert codes == [0]
    assert mock.stats["completed"] == 1


async def test_shutdown_cancels_streams_after_graceful_timeout(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn
) -> None:
    mock = await start_mock(tokens=100, token_delay=0.1)
    config = _config(tmp_path, mock, graceful_timeout=0.5)
    gateway = await spawn(*SERVE, "--config", str(config))
    url = (await gateway.wait_for(RUNNING_ON)).group(1).decode()
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=chat()) as response,
    ):
        body = response.aiter_raw()
        await anext(body)
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.RemoteProtocolError):
            async for _ in body:
                pass
    with trio.fail_after(10):
        assert await gateway.process.wait() == 0
    assert mock.stats["client_disconnects"] == 1
    assert mock.stats["active"] == 0


async def test_demo_answers_a_stream_and_stops_cleanly_on_ctrl_c(spawn: Spawn) -> None:
    demo = await spawn(PYTHON, "-m", "ntonix.cli", "demo", "--port", "0")
    url = (await demo.wait_for(rb"gateway on (http://127\.0\.0\.1:\d+)")).group(1).decode()
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(f"{url}/v1/chat/completions", json=chat())
        assert response.status_code == 200
        assert response.content.endswith(b"data: [DONE]\n\n")
        backends = set()
        ids = [response.headers["x-request-id"]]
        for index in range(3):
            answer = await client.post(f"{url}/api/chat", json=chat(f"q{index}", stream=False))
            backends.add(answer.headers["x-ntonix-backend"])
            ids.append(answer.headers["x-request-id"])
        assert backends == {"mock-1", "mock-2", "mock-3"}
    mock_pids = [int(pid) for pid in re.findall(rb"\(pid (\d+)\)", demo.output)]
    assert len(mock_pids) == 3
    assert await demo.stop(signal.SIGINT) == 0
    # Each request's access-log line, the last one's too (it ended just before the Ctrl-C).
    logged = re.findall(rb'^\{"time":"[^"]*","request_id":"([^"]+)"', demo.output, re.MULTILINE)
    assert sorted(logged) == sorted(i.encode() for i in ids)
    assert b"Traceback" not in demo.output
    assert b"ntonix demo: stopped" in demo.output
    for pid in mock_pids:  # the mock processes went with it
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_invalid_config_stops_start_up_with_clear_messages(
    tmp_path: Path, spawn: Spawn
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nidle_timout = 3\n[[backends]]\nurl = "ftp://x"\n')
    # Hypercorn 0.18's parent process exits 0 whatever its worker's exit code (run.py re-joins
    # an empty list and overwrites the code), so only `ntonix serve` can promise a non-zero exit.
    for command, env, expected_code in [
        ([*SERVE, "--config", str(bad)], {}, 1),
        ([*HYPERCORN, "ntonix:app"], {"NTONIX_CONFIG": str(bad)}, None),
    ]:
        process = await spawn(*command, env=env)
        with trio.fail_after(20):
            code = await process.process.wait()
        await trio.sleep(0.1)
        if expected_code is not None:
            assert code == expected_code
        assert b"gateway.idle_timout" in process.output
        assert b"backends[0].url" in process.output
        assert b"Traceback" not in process.output


def test_check_config_reports_problems_with_key_paths(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[[backends]]\nurl = "http://127.0.0.1:9"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[[backends]]\nurl = "http://127.0.0.1:9"\nweight = -1\n')
    run = [PYTHON, "-m", "ntonix.cli", "check-config"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    failed = subprocess.run([*run, str(bad)], capture_output=True, text=True, check=False)
    assert failed.returncode == 1
    assert "backends[0].weight" in failed.stdout


def test_workers_auto_is_one_per_core_this_process_may_use() -> None:
    args = _parser().parse_args(["serve", "--workers", "auto"])
    assert args.workers == len(os.sched_getaffinity(0))
    assert _parser().parse_args(["serve", "--workers", "3"]).workers == 3
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--workers", "0"])
