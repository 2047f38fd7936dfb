"""Streaming pass-through: chunks arrive as they are made, bytes are forwarded unchanged."""

from __future__ import annotations

import json
import time
from functools import partial

import httpx
import pytest
import trio

import ntonix.worker
from mocks.lean import serve_lean
from mocks.llm import MockLLM, MockOptions
from ntonix.plain_socket import write_now
from tests.conftest import StartGateway, StartMock
from tests.support import RawClient, chat, sse_events


async def test_sse_chunks_reach_the_client_as_the_backend_makes_them(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=20, token_delay=0.05, ttft=0.05)
    gateway = await start_gateway(mock)
    arrivals = []
    start = time.monotonic()
    async with client.stream("POST", f"{gateway}/v1/chat/completions", json=chat()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-ntonix-backend"] == "backend-0"
        async for _ in response.aiter_raw():
            arrivals.append(time.monotonic() - start)
    # The backend needs about 1 s for 20 tokens; the first chunk must not wait for the last.
    assert arrivals[-1] > 0.8
    assert arrivals[0] < arrivals[-1] / 2
    assert len(arrivals) >= 10


async def test_streamed_bytes_equal_what_the_backend_sent(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway(mock)
    for path, body in [
        ("/v1/chat/completions", chat()),
        ("/v1/chat/completions", chat(stream=False)),
        (
            "/v1/completions",
            {"model": "mock-llm", "prompt": "Hi", "temperature": 0, "stream": True},
        ),
        ("/api/chat", chat()),
        ("/api/generate", {"model": "mock-llm", "prompt": "Hi", "options": {"seed": 7}}),
    ]:
        direct = await client.post(f"{mock.url}{path}", json=body)
        proxied = await client.post(f"{gateway}{path}", json=body)
        assert proxied.status_code == direct.status_code == 200, path
        assert proxied.content == direct.content, path
        assert proxied.headers["content-type"] == direct.headers["content-type"]


async def test_openai_sse_stream_is_complete(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock(tokens=5))
    response = await client.post(f"{gateway}/v1/chat/completions", json=chat())
    events = sse_events(response.content)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_ollama_ndjson_stream_is_forwarded_line_by_line(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock(tokens=6))
    async with client.stream("POST", f"{gateway}/api/chat", json=chat()) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert "".join(line["message"]["content"] for line in lines)


async def test_non_streaming_json_is_forwarded_with_its_length(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock())
    response = await client.post(f"{gateway}/v1/chat/completions", json=chat(stream=False))
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.json()["choices"][0]["message"]["content"]
    assert response.headers["x-request-id"]


async def test_a_body_larger_than_a_socket_takes_at_once_arrives_whole(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    # The gateway writes what the kernel takes at once, then waits for room for the rest.
    gateway = await start_gateway(await start_mock(tokens=300_000, ttft=0, token_delay=0))
    response = await client.post(f"{gateway}/v1/chat/completions", json=chat(stream=False))
    assert response.status_code == 200
    assert len(response.content) > 1_000_000
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.json()["choices"][0]["message"]["content"]


async def test_a_whole_answer_leaves_in_one_write_and_a_stream_head_at_once(
    nursery: trio.Nursery,
    start_mock: StartMock,
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[bytes] = []

    def recording(sock: trio.socket.SocketType, data: bytes) -> int:
        writes.append(bytes(data))
        return write_now(sock, data)

    monkeypatch.setattr(ntonix.worker, "write_now", recording)  # the client side's writes
    # The lean mock writes a whole answer's head and body together, as many servers do.
    lean = MockLLM(MockOptions(tokens=3, ttft=0, token_delay=0))
    port = await nursery.start(partial(serve_lean, lean, host="127.0.0.1", port=0))
    gateway = await start_gateway(f"http://127.0.0.1:{port}")
    cases = [
        (chat(stream=False), b'"usage"'),  # an answer that came whole: head and body together
        ({"messages": []}, b'"model_required"'),  # the gateway's own error: the same
    ]
    for payload, end in cases:
        writes.clear()
        client = await RawClient.connect(gateway)
        await client.send_request("POST", "/v1/chat/completions", payload)
        await client.read_until(end)
        assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 ") and end in writes[0]
        await client.hang_up()
    # Hypercorn's mock sends a stream's head first: it goes on at once, not held for the first
    # token (0.2 s later).
    gateway = await start_gateway(await start_mock(ttft=0.2))
    writes.clear()
    client = await RawClient.connect(gateway)
    await client.send_request("POST", "/v1/chat/completions", chat())
    await client.read_until(b"\r\n\r\n")
    assert writes and writes[0].startswith(b"HTTP/1.1 200") and b"data:" not in writes[0]
    await client.read_until(b"[DONE]")
    await client.hang_up()


async def test_request_id_is_passed_through(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway(mock)
    response = await client.post(
        f"{gateway}/v1/chat/completions", json=chat(stream=False), headers={"x-request-id": "r-1"}
    )
    assert response.headers["x-request-id"] == "r-1"
    seen = mock.stats["last_headers"]
    assert seen["x-request-id"] == "r-1"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"


async def test_round_robin_spreads_requests_over_backends(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mocks = [await start_mock(name=f"m{i}") for i in range(3)]
    gateway = await start_gateway(*mocks)
    for index in range(9):
        response = await client.post(
            f"{gateway}/v1/chat/completions", json=chat(f"q{index}", stream=False)
        )
        assert response.status_code == 200
    assert [m.stats["requests"] for m in mocks] == [3, 3, 3]


async def test_keep_alive_connections_are_reused(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock())
    for index in range(10):
        await client.post(f"{gateway}/v1/chat/completions", json=chat(f"q{index}", stream=False))
    pool = (await client.get(f"{gateway}/ntonix/status")).json()["backends"][0]["pool"]
    assert pool["opened"] == 1
    assert pool["reused"] == 9
