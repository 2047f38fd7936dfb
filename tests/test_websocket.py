"""WebSocket sessions through the gateway: a trio-websocket client, a real gateway on
Hypercorn, real mock backends serving /v1/realtime; every byte and every close checked on the
other side."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from ntonix.config import AuthSettings, KeySettings, WebSocketSettings
from tests.conftest import StartGatewayWith, StartMock
from tests.support import (
    RawClient,
    backend,
    closed_port_url,
    status,
    wait_for_backend,
    wait_for_queued,
    wait_until,
)
from tests.websockets import (
    MODEL,
    VanishingClient,
    answer_of,
    event,
    refusal,
    ws_config,
    ws_url,
)

CLOSE_BOUND = 0.1  # seconds: a close reaches the other side within this


def idle(record: dict[str, Any]) -> bool:
    """A backend with no session or request in flight."""
    return record["active_requests"] == 0


async def test_text_and_binary_cross_unchanged_and_in_order(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock("a", tokens=2, ttft=0, token_delay=0)
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a")))
    texts = ["hello", "é ✓ 漢字 🎙", json.dumps({"type": "input_audio_buffer.append"}), ""]
    blobs = [bytes(range(256)), b"", b"\x00" * 70_000]
    async with open_websocket_url(ws_url(gateway)) as ws:
        created = event(await ws.get_message())
        assert created == {"type": "session.created", "session": {"model": MODEL}}
        for text in texts:
            await ws.send_message(text)
        for text in texts:
            assert (await answer_of(ws))["input"] == text
        for blob in blobs:
            await ws.send_message(blob)
        for blob in blobs:
            assert await ws.get_message() == blob
        print("READ", trio.current_time())
    headers = mock.stats["realtime"]["last_headers"]
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert "authorization" not in headers


async def test_the_client_close_reaches_the_backend_with_its_code_and_reason(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock("a")
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a")))
    async with open_websocket_url(ws_url(gateway)) as ws:
        await ws.get_message()
        await wait_until(lambda: mock.stats["realtime"]["active"] == 1)
        closed_at = time.monotonic()
        await ws.aclose(4005, "user hung up")
    took = await wait_until(lambda: mock.stats["realtime"]["active"] == 0)
    assert time.monotonic() - closed_at < CLOSE_BOUND, took
    assert mock.stats["realtime"]["closes"] == [{"code": 4005, "reason": "user hung up"}]
    await wait_for_backend(client, gateway, "a", idle, timeout=CLOSE_BOUND)


@pytest.mark.parametrize(("code", "reason"), [(1000, "done"), (1008, "policy"), (4001, "quota")])
async def test_the_backend_close_reaches_the_client_with_its_code_and_reason(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, code: int, reason: str
) -> None:
    mock = await start_mock("a")
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a")))
    steer = [(b"x-mock-close", str(code).encode()), (b"x-mock-close-reason", reason.encode())]
    async with open_websocket_url(ws_url(gateway), extra_headers=steer) as ws:
        await ws.get_message()  # session.created
        with trio.fail_after(CLOSE_BOUND), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason is not None
    assert (closed.value.reason.code, closed.value.reason.reason) == (code, reason)


async def test_a_client_that_vanishes_closes_its_upstream_within_100ms(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    nursery: trio.Nursery,
) -> None:
    mock = await start_mock("a")
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a")))
    vanishing = await VanishingClient.connect(nursery, gateway, f"/v1/realtime?model={MODEL}")
    await vanishing.ws.get_message()
    await vanishing.reset()
    took = await wait_until(lambda: mock.stats["realtime"]["active"] == 0)
    assert took < CLOSE_BOUND
    assert mock.stats["realtime"]["closes"] == [{"code": 1001, "reason": "client gone"}]
    await wait_for_backend(client, gateway, "a", idle, timeout=CLOSE_BOUND)


@pytest.mark.parametrize("direction", ["to_backend", "to_client"])
async def test_a_message_over_max_message_size_closes_both_sides_with_1009(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, direction: str
) -> None:
    mock = await start_mock("a", tokens=1, ttft=0)
    limit = WebSocketSettings(max_message_size=1000)
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a"), websocket=limit))
    async with open_websocket_url(ws_url(gateway)) as ws:
        await ws.get_message()
        # To the client: the mock's answer quotes a 950-byte input, which makes it too big.
        await ws.send_message("x" * (1001 if direction == "to_backend" else 950))
        with trio.fail_after(1), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 1009
    await wait_until(lambda: mock.stats["realtime"]["active"] == 0)
    assert [c["code"] for c in mock.stats["realtime"]["closes"]] == [1009]


async def test_refusals_are_http_statuses_read_before_the_handshake_completes(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock("a", models=("mock-llm",))
    auth = AuthSettings(api_keys=("good-key",), max_concurrent_per_key=1)
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a"), auth=auth))
    key = [(b"authorization", b"Bearer good-key")]
    assert (await refusal(ws_url(gateway)))[0] == 401
    assert (await refusal(ws_url(gateway), [(b"authorization", b"Bearer bad")]))[0] == 401
    missing = await refusal(ws_url(gateway, model=None), key)
    assert missing == (400, missing[1]) and missing[1]["error"]["code"] == "model_required"
    unknown = await refusal(ws_url(gateway, model="nobody-serves-this"), key)
    assert unknown[0] == 404 and unknown[1]["error"]["code"] == "model_not_found"
    ollama = await refusal(ws_url(gateway, path="/api/realtime", model="nobody-serves-this"), key)
    assert ollama[0] == 404 and isinstance(ollama[1]["error"], str)  # Ollama's shape on /api/
    escaping = await refusal(ws_url(gateway, path="/v1/../admin"), key)
    assert escaping[0] in (400, 404)
    forbidden = await refusal(ws_url(gateway), [*key, (b"x-mock-status", b"403")])
    assert forbidden[0] == 403  # the backend's own refusal, passed on
    elsewhere = await refusal(ws_url(gateway, path="/api/realtime"), key)
    assert elsewhere[0] == 404  # /api/* is proxied too: this mock serves only /v1/realtime
    assert mock.stats["realtime"]["refused"] == 2
    async with open_websocket_url(ws_url(gateway), extra_headers=key) as ws:
        await ws.get_message()
        over = await refusal(ws_url(gateway), key)
        assert over[0] == 429 and over[1]["error"]["code"] == "rate_limit_exceeded"
    assert mock.stats["realtime"]["sessions"] == 1


async def test_a_named_key_may_open_sessions_only_for_its_models(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock("a", models=("mock-llm", "other"))
    auth = AuthSettings(keys=(KeySettings(name="narrow", key="sk-narrow", models=("mock-llm",)),))
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a"), auth=auth))
    key = [(b"authorization", b"Bearer sk-narrow")]
    refused = await refusal(ws_url(gateway, model="other"), key)
    assert refused[0] == 403 and refused[1]["error"]["code"] == "model_not_allowed"
    async with open_websocket_url(ws_url(gateway, model="mock-llm"), extra_headers=key) as ws:
        await ws.get_message()
    assert mock.stats["realtime"]["sessions"] == 1


async def test_a_busy_pool_refuses_with_503(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock("a")
    config = ws_config(backend(mock.url, "a", max_concurrent=1), queue_timeout=0)
    gateway = await start_gateway_with(config)
    async with open_websocket_url(ws_url(gateway)) as ws:
        await ws.get_message()
        busy = await refusal(ws_url(gateway))
        assert busy[0] == 503 and busy[1]["error"]["code"] == "backends_busy"
    await wait_until(lambda: mock.stats["realtime"]["active"] == 0)
    async with open_websocket_url(ws_url(gateway)) as ws:  # its slot came back
        await ws.get_message()


async def test_a_backend_down_or_refusing_at_handshake_time_is_skipped(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    refusing = await start_mock("refusing")
    refusing.mock.realtime.refuse_with = 503
    good = await start_mock("good")
    config = ws_config(
        backend(closed_port_url(), "down"),
        backend(refusing.url, "refusing"),
        backend(good.url, "good"),
    )
    gateway = await start_gateway_with(config)
    for _ in range(3):
        async with open_websocket_url(ws_url(gateway)) as ws:
            assert event(await ws.get_message())["type"] == "session.created"
    assert good.stats["realtime"]["sessions"] == 3
    assert refusing.stats["realtime"]["refused"] >= 1
    by_name = {b["name"]: b for b in (await status(client, gateway))["backends"]}
    assert by_name["down"]["consecutive_failures"] >= 1
    assert "refused the WebSocket handshake with 503" in by_name["refusing"]["last_error"]
    await wait_for_backend(client, gateway, "good", idle)


async def test_an_idle_session_is_closed_and_pings_keep_one_alive(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock("a")
    settings = WebSocketSettings(idle_timeout=0.3, ping_interval=0.05)
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a"), websocket=settings))
    stall = [(b"x-mock-stall", b"1")]
    async with open_websocket_url(ws_url(gateway), extra_headers=stall) as ws:
        await ws.get_message()
        for _ in range(10):  # 0.6 s: the client's pings and the backend's pongs count
            await ws.ping()
            await trio.sleep(0.06)
        started = trio.current_time()
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()  # a client that stops pinging is taken for gone
        assert trio.current_time() - started == pytest.approx(0.3, abs=0.15)
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1001 and "client idle" in (closed.value.reason.reason or "")
    await wait_until(lambda: mock.stats["realtime"]["active"] == 0)
    assert mock.stats["realtime"]["closes"][0]["code"] == 1001


async def test_a_client_that_stops_reading_gets_back_pressure_not_a_growing_buffer(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock("a")
    gateway = await start_gateway_with(ws_config(backend(mock.url, "a")))
    blobs = [bytes([index]) * 1024 * 1024 for index in range(60)]
    sent = 0

    async def send_all(ws: WebSocketConnection) -> None:
        nonlocal sent
        for blob in blobs:
            await ws.send_message(blob)
            sent += 1

    async with open_websocket_url(ws_url(gateway)) as ws, trio.open_nursery() as nursery:
        await ws.get_message()
        # The mock echoes; nobody reads the echoes: every hop's buffers fill, then sends stall.
        nursery.start_soon(send_all, ws)
        await trio.sleep(1.0)
        assert 0 < sent < 50, sent
        for blob in blobs:  # reading lets the rest through: nothing lost or reordered
            assert await ws.get_message() == blob


UPGRADE = (
    b"GET /v1/realtime?model=mock-llm HTTP/1.1\r\nhost: gateway\r\nupgrade: websocket\r\n"
    b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"sec-websocket-version: 13\r\n\r\n"
)


async def test_a_client_that_leaves_while_its_handshake_waits_leaves_nothing_behind(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock("a")
    config = ws_config(backend(mock.url, "a", max_concurrent=1), queue_timeout=10)
    gateway = await start_gateway_with(config)
    async with open_websocket_url(ws_url(gateway)) as ws:
        await ws.get_message()
        waiting = await RawClient.connect(gateway)
        await waiting.stream.send_all(UPGRADE)
        await wait_for_queued(client, gateway, 1)
        await waiting.hang_up()
        await wait_for_queued(client, gateway, 0, timeout=CLOSE_BOUND)
    await wait_until(lambda: mock.stats["realtime"]["active"] == 0)
    async with open_websocket_url(ws_url(gateway)) as ws:  # no slot was lost
        await ws.get_message()
    assert mock.stats["realtime"]["sessions"] == 2
    await wait_for_backend(client, gateway, "a", idle)
