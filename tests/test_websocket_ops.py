"""WebSocket sessions in operation: wss:// backends, load, a killed backend, shutdown, and
what /metrics and the access log say about sessions."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from functools import partial
from pathlib import Path

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, open_websocket_url

from mocks.llm import MockLLM, MockOptions
from ntonix.config import LogSettings
from ntonix.server import serve
from tests.conftest import StartGatewayWith, StartMock
from tests.support import (
    PYTHON,
    RUNNING_ON,
    SERVE,
    Spawn,
    backend,
    wait_for_backend,
    wait_until,
)
from tests.websockets import answer_of, event, refusal, ws_config, ws_url


async def _wss_mock(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> tuple[MockLLM, str]:
    """A mock backend on Hypercorn over TLS, its certificate for 127.0.0.1 signed by `ca`."""
    certificate = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(cert_file)
    certificate.private_key_pem.write_to_path(key_file)
    settings = hypercorn.config.Config()
    settings.bind = ["127.0.0.1:0"]
    settings.certfile, settings.keyfile = str(cert_file), str(key_file)
    mock = MockLLM(MockOptions(tokens=1, ttft=0))
    binds = await nursery.start(partial(hypercorn.trio.serve, mock, settings, mode="asgi"))
    return mock, binds[0].replace("http://", "https://")


async def test_a_wss_backend_is_verified_with_its_ca_file(
    nursery: trio.Nursery, start_gateway_with: StartGatewayWith, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    mock, url = await _wss_mock(nursery, tmp_path, ca)
    gateway = await start_gateway_with(ws_config(backend(url, "tls", ca_file=str(ca_file))))
    async with open_websocket_url(ws_url(gateway)) as ws:
        await ws.get_message()
        await ws.send_message(b"over tls")
        assert await ws.get_message() == b"over tls"
    assert mock.stats()["realtime"]["sessions"] == 1


async def test_an_unverified_wss_backend_is_refused_with_502(
    nursery: trio.Nursery, start_gateway_with: StartGatewayWith, tmp_path: Path
) -> None:
    mock, url = await _wss_mock(nursery, tmp_path, trustme.CA())
    gateway = await start_gateway_with(ws_config(backend(url, "untrusted"), retries=0))
    status_code, body = await refusal(ws_url(gateway))
    assert status_code == 502
    assert "certificate verification failed" in body["error"]["message"]
    assert mock.stats()["realtime"]["sessions"] == 0


async def test_a_hundred_sessions_spread_over_two_backends(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mocks = [await start_mock(name, tokens=2, ttft=0.01, token_delay=0.01) for name in "ab"]
    config = ws_config(*(backend(m.url, m.mock.options.name) for m in mocks))
    gateway = await start_gateway_with(config)
    opened = trio.Event()
    ready = 0

    async def session(index: int) -> None:
        nonlocal ready
        async with open_websocket_url(ws_url(gateway)) as ws:
            await ws.get_message()
            ready += 1
            if ready == 100:
                opened.set()
            await opened.wait()  # all 100 open at once
            await ws.send_message(f"session {index}")
            assert (await answer_of(ws))["input"] == f"session {index}"
            await ws.send_message(bytes([index]))
            assert await ws.get_message() == bytes([index])

    with trio.fail_after(20):
        async with trio.open_nursery() as sessions:
            for index in range(100):
                sessions.start_soon(session, index)
    counts = [m.stats["realtime"]["sessions"] for m in mocks]
    assert sum(counts) == 100 and min(counts) >= 40, counts
    await wait_until(lambda: all(m.stats["realtime"]["active"] == 0 for m in mocks))
    for name in "ab":
        await wait_for_backend(client, gateway, name, lambda b: b["active_requests"] == 0)
    metrics = (await client.get(f"{gateway}/metrics")).text
    assert "ntonix_websocket_sessions_active 0.0" in metrics
    total = sum(
        float(value)
        for value in re.findall(r'ntonix_websocket_sessions_total\{.*status="101"\} (\S+)', metrics)
    )
    assert total == 100
    assert 'ntonix_websocket_messages_total{direction="to_backend"} 200.0' in metrics
    assert "ntonix_websocket_session_duration_seconds_count 100.0" in metrics


async def test_a_killed_backend_closes_its_sessions_with_1011(
    spawn: Spawn, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    child = await spawn(PYTHON, "-m", "mocks.llm", "--name", "doomed", "--port", "0")
    url = (await child.wait_for(rb"listening on (http://127\.0\.0\.1:\d+)")).group(1).decode()
    gateway = await start_gateway_with(ws_config(backend(url, "doomed")))
    async with open_websocket_url(ws_url(gateway)) as ws:
        await ws.get_message()
        await child.kill()
        with trio.fail_after(1), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason is not None
    assert (closed.value.reason.code, closed.value.reason.reason) == (1011, "backend gone")
    record = await wait_for_backend(client, gateway, "doomed", lambda b: b["active_requests"] == 0)
    assert record["consecutive_failures"] >= 1


async def test_shutdown_gives_sessions_graceful_timeout_then_closes_them_with_1001(
    nursery: trio.Nursery, start_mock: StartMock, tmp_path: Path
) -> None:
    mock = await start_mock("a")
    log_file = tmp_path / "access.log"
    config = attrs.evolve(
        ws_config(backend(mock.url, "a"), graceful_timeout=1.0),
        log=LogSettings(access_log=str(log_file)),
    )
    stop = trio.Event()
    run = partial(serve, config, ["127.0.0.1:0"], shutdown_trigger=stop.wait)
    gateway = (await nursery.start(run))[0]
    async with open_websocket_url(ws_url(gateway)) as ws:
        await ws.get_message()
        stop.set()
        stopped_at = trio.current_time()
        await ws.send_message("still served while draining")
        assert event(await ws.get_message())["type"] == "response.text.delta"
        with trio.fail_after(2), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        waited = trio.current_time() - stopped_at
    assert closed.value.reason is not None and closed.value.reason.code == 1001
    assert 0.4 < waited < 1.0
    await wait_until(lambda: mock.stats["realtime"]["active"] == 0)
    assert mock.stats["realtime"]["closes"] == [{"code": 1001, "reason": "gateway shutting down"}]
    await wait_until(lambda: log_file.exists() and b"websocket" in log_file.read_bytes())
    line = json.loads(log_file.read_bytes().splitlines()[-1])
    assert line["status"] == 101 and line["backend"] == "a"
    assert line["websocket"]["closed_by"] == "gateway"
    assert line["websocket"]["client_close"] == line["websocket"]["backend_close"] == 1001
    assert line["websocket"]["messages_in"] == 1 and line["websocket"]["messages_out"] >= 2


async def test_the_openai_sdk_realtime_client_works_through_the_gateway(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    pytest.importorskip("websockets", reason="pip install 'openai[realtime]'")
    mock = await start_mock("a", tokens=3, ttft=0, token_delay=0)
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a")))

    async def converse() -> list[str]:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=f"{gateway}/v1", api_key="sk-client")
        async with client.realtime.connect(model="mock-llm") as connection:
            seen = [(await connection.recv()).type]
            await connection.send({"type": "response.create"})
            while seen[-1] != "response.text.done":
                seen.append((await connection.recv()).type)
            await connection.close(code=4002, reason="sdk done")
        return seen

    # The SDK speaks asyncio: it runs in a thread of its own.
    seen = await trio.to_thread.run_sync(asyncio.run, converse())
    assert seen == ["session.created", *["response.text.delta"] * 3, "response.text.done"]
    await wait_until(lambda: mock.stats["realtime"]["active"] == 0)
    assert mock.stats["realtime"]["closes"] == [{"code": 4002, "reason": "sdk done"}]
    assert "authorization" not in mock.stats["realtime"]["last_headers"]


async def test_sigterm_closes_open_sessions_with_1001_and_the_gateway_exits(
    spawn: Spawn, start_mock: StartMock, tmp_path: Path
) -> None:
    mock = await start_mock("a")
    config = tmp_path / "ntonix.toml"
    config.write_text(
        f'[gateway]\ngraceful_timeout = 1.0\n[[backends]]\nname = "a"\nurl = "{mock.url}"\n'
    )
    gateway = await spawn(*SERVE, "--config", str(config))
    url = (await gateway.wait_for(RUNNING_ON)).group(1).decode()
    async with open_websocket_url(ws_url(url)) as ws:
        await ws.get_message()
        gateway.process.send_signal(signal.SIGTERM)
        with trio.fail_after(3), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 1001
    with trio.fail_after(5):
        assert await gateway.process.wait() == 0
    await wait_until(lambda: mock.stats["realtime"]["active"] == 0)
    assert mock.stats["realtime"]["closes"] == [{"code": 1001, "reason": "gateway shutting down"}]
