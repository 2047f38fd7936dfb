"""The access log: one JSON line per request, whatever way it ended, with no secrets in it."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ntonix.accesslog import access_line
from ntonix.config import AuthSettings, BackendSettings, Config, GatewaySettings, LogSettings
from ntonix.core.telemetry import RequestRecord
from ntonix.server import serve
from tests.conftest import StartGatewayWith, StartMock
from tests.support import (
    PYTHON,
    RUNNING_ON,
    SERVE,
    RawClient,
    Spawn,
    chat,
    spawn_serve,
    wait_until,
)

FIELDS = {
    "time",
    "request_id",
    "client",
    "key",
    "method",
    "path",
    "model",
    "backend",
    "status",
    "cache",
    "outcome",
    "error",
    "retries",
    "ttfb_ms",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "prompt_tokens",
    "completion_tokens",
    "tokens_estimated",
}
API_KEY = "sk-client-key-never-logged"
PROMPT = "a prompt that must never reach the log"


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_one_json_line_per_request_however_it_ended(
    tmp_path: Path,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
) -> None:
    log_file = tmp_path / "access.log"
    mock = await start_mock()
    config = Config(
        backends=(BackendSettings(name="m", url=mock.url),),
        gateway=GatewaySettings(first_byte_timeout=0.3, retries=0),
        auth=AuthSettings(api_keys=(API_KEY,)),
        log=LogSettings(access_log=str(log_file)),
    )
    gateway = await start_gateway_with(config)
    auth = {"authorization": f"Bearer {API_KEY}"}
    url = f"{gateway}/v1/chat/completions"
    ok = await client.post(url, json=chat(PROMPT), headers=auth)
    hit = await client.post(url, json=chat(PROMPT), headers=auth)
    # Some clients put their key in the query string: it is never logged either.
    unauthorised = await client.post(f"{url}?key={API_KEY}", json=chat("x"))
    malformed = await client.post(url, content=b"{", headers=auth)
    hang = {**auth, "x-mock-hang": "1"}
    timed_out = await client.post(url, json=chat("slow", stream=False), headers=hang)
    assert [r.status_code for r in (ok, hit, unauthorised, malformed, timed_out)] == [
        200,
        200,
        401,
        400,
        504,
    ]
    raw = await RawClient.connect(gateway)
    slow = {**auth, "x-mock-tokens": "200", "x-mock-token-delay": "0.02"}
    await raw.send_request("POST", "/v1/chat/completions", chat("long"), headers=slow)
    await raw.read_until(b'"content"')
    await raw.hang_up()

    await wait_until(lambda: len(_lines(log_file)) == 6, timeout=5)
    text = log_file.read_text()
    assert API_KEY not in text and PROMPT not in text and "?key" not in text
    lines = _lines(log_file)
    assert all(set(line) == FIELDS for line in lines)
    by_id = {line["request_id"]: line for line in lines}
    first = by_id[ok.headers["x-request-id"]]
    assert first["status"] == 200 and first["outcome"] == "ok"
    assert first["backend"] == "m" and first["cache"] == "miss" and first["model"] == "mock-llm"
    assert first["path"] == "/v1/chat/completions" and first["method"] == "POST"
    assert first["client"] == "127.0.0.1" and first["retries"] == 0
    assert first["bytes_out"] == len(ok.content) and first["bytes_in"] == len(ok.request.content)
    assert 0 < first["ttfb_ms"] <= first["duration_ms"]
    assert first["time"].endswith("Z")
    second = by_id[hit.headers["x-request-id"]]
    assert second["cache"] == "hit" and second["backend"] is None and second["status"] == 200
    outcomes = [(line["status"], line["outcome"], line["error"]) for line in lines[2:]]
    assert outcomes == [
        (401, "error", "invalid_api_key"),
        (400, "error", "invalid_json"),
        (504, "error", "backend_timeout"),
        (200, "client_disconnected", None),
    ]
    # The 504 is written after first_byte_timeout (0.3 s): its body is its first byte.
    assert lines[4]["backend"] == "m" and lines[4]["ttfb_ms"] >= 300
    assert lines[5]["bytes_out"] > 0


async def test_a_reload_reopens_the_log_file_so_it_can_be_rotated(
    tmp_path: Path, start_mock: StartMock, nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    log_file = tmp_path / "access.log"
    mock = await start_mock()
    config_file = tmp_path / "ntonix.toml"
    config_file.write_text(
        f'[log]\naccess_log = "{log_file}"\n[[backends]]\nname = "m"\nurl = "{mock.url}"\n'
    )
    config = Config.from_file(str(config_file))
    run = partial(
        serve,
        config,
        ["127.0.0.1:0"],
        shutdown_trigger=trio.sleep_forever,
        config_file=str(config_file),
    )
    gateway = (await nursery.start(run))[0]
    await client.get(f"{gateway}/v1/models")
    await wait_until(lambda: len(_lines(log_file)) == 1)
    log_file.rename(tmp_path / "access.log.1")  # what logrotate does, before it signals
    assert (await client.post(f"{gateway}/ntonix/reload")).json()["reloaded"] is True
    await client.get(f"{gateway}/v1/models")
    # The reload's own line is written when it has been answered: into the new file.
    await wait_until(lambda: len(_lines(log_file)) == 2)
    assert [line["path"] for line in _lines(log_file)] == ["/ntonix/reload", "/v1/models"]
    assert [line["path"] for line in _lines(tmp_path / "access.log.1")] == ["/v1/models"]


async def test_the_log_goes_to_stderr_by_default(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn
) -> None:
    mock = await start_mock()
    gateway, url = await spawn_serve(spawn, tmp_path, mock.url)
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{url}/v1/chat/completions", json=chat())
    line = await gateway.wait_for(rb'\{"time":[^\n]*"path":"/v1/chat/completions"[^\n]*\}\n')
    entry = json.loads(line.group(0))
    assert entry["request_id"] == response.headers["x-request-id"]
    assert entry["status"] == 200


def test_a_line_is_compact_json_with_a_utc_millisecond_time() -> None:
    record = RequestRecord(
        started=100.0,
        wall_time=1_795_773_249.0423,
        request_id=b"abc",
        client="10.0.0.7",
        method="POST",
        path='/v1/"odd"\npath',
        cache="",
    )
    record.status, record.first_byte_at = 200, 100.0125
    line = access_line(record, now=100.5)
    assert line.endswith(b"}\n") and b" " not in line
    entry = json.loads(line)
    assert entry["time"] == "2026-11-27T09:54:09.042Z"
    assert entry["path"] == '/v1/"odd"\npath'
    assert (entry["ttfb_ms"], entry["duration_ms"]) == (12.5, 500.0)
    assert entry["cache"] is None and entry["backend"] is None


# --- No line lost at shutdown, whatever the command and the signal --------------------------

COMMANDS = {
    "serve": [*SERVE],
    "serve_2_workers": [*SERVE, "--workers", "2"],
    "hypercorn": [PYTHON, "-m", "hypercorn", "--worker-class", "trio", "--bind", "127.0.0.1:0"],
}
STOPS: dict[str, Callable[[int], None]] = {
    "ctrl_c": lambda pid: os.killpg(pid, signal.SIGINT),  # a terminal signals the whole group
    "sigterm": lambda pid: os.kill(pid, signal.SIGTERM),  # kill, docker stop: the parent only
    "sigterm_to_the_group": lambda pid: os.killpg(pid, signal.SIGTERM),  # systemd's default
}
REQUESTS_BEFORE_THE_STOP = 10


@pytest.mark.parametrize("stop", STOPS.values(), ids=STOPS.keys())
@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
async def test_every_request_has_its_line_after_a_stop_signal(
    command: list[str],
    stop: Callable[[int], None],
    tmp_path: Path,
    start_mock: StartMock,
    spawn: Spawn,
) -> None:
    """Requests that ended just before the signal, and a stream drained after it: one line
    each, written before the process exits."""
    log_file = tmp_path / "access.log"
    mock = await start_mock(ttft=0, token_delay=0, tokens=2)
    config = tmp_path / "ntonix.toml"
    config.write_text(
        f'[log]\naccess_log = "{log_file}"\n[cache]\nenabled = false\n'
        f'[[backends]]\nname = "m"\nurl = "{mock.url}"\n'
    )
    workers = 2 if "--workers" in command else 1
    gateway = await spawn(
        *command,
        *(["ntonix:app"] if "hypercorn" in command else ["--config", str(config)]),
        env={"NTONIX_CONFIG": str(config)},
        start_new_session=True,  # a group of its own, as a shell's job has
    )
    await gateway.wait_for(RUNNING_ON)
    with trio.fail_after(30):
        while len(found := re.findall(RUNNING_ON, gateway.output)) < workers:
            await trio.sleep(0.01)
    url = found[0].decode()
    ids = []
    async with httpx.AsyncClient(timeout=30) as client:
        slow = {"x-mock-tokens": "15", "x-mock-token-delay": "0.1"}
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=chat(), headers=slow
        ) as stream:
            body = stream.aiter_raw()
            received = [await anext(body)]
            for index in range(REQUESTS_BEFORE_THE_STOP):
                response = await client.post(
                    f"{url}/v1/chat/completions", json=chat(f"q{index}", stream=False)
                )
                assert response.status_code == 200
                ids.append(response.headers["x-request-id"])
            stop(gateway.pid)
            received += [chunk async for chunk in body]  # drained after the signal
            ids.append(stream.headers["x-request-id"])
    assert b"".join(received).endswith(b"data: [DONE]\n\n")
    with trio.fail_after(20):
        assert await gateway.process.wait() == 0
    assert sorted(line["request_id"] for line in _lines(log_file)) == sorted(ids)
    assert b"Traceback" not in gateway.output
