"""Every failure the client can see is a clear JSON error or stream error in its own API's
dialect: OpenAI's `{"error": {"message", "type", "code"}}`, Ollama's `{"error": "message"}` on
/api/, with the same status codes."""

from __future__ import annotations

import json
import socket
from functools import partial

import attrs
import httpx
import ollama
import pytest
import trio

from tests.conftest import StartGateway, StartMock
from tests.support import (
    RawClient,
    answers_200,
    chat,
    eventually,
    pool_totals,
    sse_events,
    status,
    wait_until,
)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _error(response: httpx.Response) -> dict[str, str]:
    assert response.headers["content-type"] == "application/json"
    error: dict[str, str] = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    return error


def _ollama_error(response: httpx.Response) -> str:
    """Ollama's shape: an object with one key, `error`, whose value is the message."""
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    message: str = body["error"]
    return message


@attrs.frozen
class BadRequest:
    name: str
    method: str
    path: str
    content: bytes
    status: int
    code: str
    says: str = ""  # in the message, whatever the dialect
    allow: str = ""  # a 405's Allow header


ENCODED = "Encoded '/', '\\' or '.' is not allowed in paths"
BAD_REQUESTS = [
    BadRequest(
        "malformed json", "POST", "/v1/chat/completions", b'{"model": ', 400, "invalid_json"
    ),
    BadRequest("not an object", "POST", "/v1/chat/completions", b"[]", 400, "invalid_json"),
    BadRequest(
        "invalid utf-8", "POST", "/v1/chat/completions", b'{"model": "\xff"}', 400, "invalid_json"
    ),
    BadRequest(
        "missing model", "POST", "/v1/chat/completions", b'{"messages": []}', 400, "model_required"
    ),
    BadRequest(
        "model not a string (ollama)",
        "POST",
        "/api/chat",
        b'{"model": 1}',
        400,
        "model_required",
        says="'model' is required and must be a string",
    ),
    BadRequest(
        "malformed json (ollama)", "POST", "/api/generate", b"{", 400, "invalid_json", "Malformed"
    ),
    BadRequest(
        "stream not a bool",
        "POST",
        "/v1/completions",
        b'{"model": "m", "stream": 1}',
        400,
        "invalid_type",
    ),
    BadRequest("unknown route", "GET", "/v2/whatever", b"", 404, "unknown_route"),
    BadRequest("root", "GET", "/", b"", 404, "unknown_route"),
    BadRequest("dot segment", "GET", "/v1/../ntonix/status", b"", 400, "invalid_path"),
    BadRequest("encoded slash", "GET", "/v1/models%2F..%2Fx", b"", 400, "invalid_path"),
    BadRequest("trace", "TRACE", "/v1/models", b"", 405, "method_not_allowed"),
    BadRequest(
        "get on chat completions",
        "GET",
        "/v1/chat/completions",
        b"",
        405,
        "method_not_allowed",
        says="GET is not allowed on /v1/chat/completions: use POST",
        allow="POST",
    ),
    BadRequest(
        "post on models", "POST", "/v1/models", b"{}", 405, "method_not_allowed", allow="GET, HEAD"
    ),
    BadRequest(
        "get on ollama chat (ollama)",
        "GET",
        "/api/chat",
        b"",
        405,
        "method_not_allowed",
        says="GET is not allowed on /api/chat: use POST",
        allow="POST",
    ),
    BadRequest("put on tags (ollama)", "PUT", "/api/tags", b"", 405, "", allow="GET, HEAD"),
    # Encoded separators: the same answer wherever the %2F stands.
    BadRequest("encoded prefix slash", "GET", "/v1%2Fmodels", b"", 400, "invalid_path", ENCODED),
    BadRequest(
        "encoded route slash",
        "POST",
        "/v1/chat%2Fcompletions",
        b"{}",
        400,
        "invalid_path",
        ENCODED,
    ),
    BadRequest(
        "encoded slash (ollama)", "POST", "/api%2Fchat", b"{}", 400, "invalid_path", ENCODED
    ),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=lambda case: case.name)
async def test_bad_requests_get_clear_errors_and_never_reach_a_backend(
    case: BadRequest, start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway(mock)
    raw = await RawClient.connect(gateway)
    head = (
        f"{case.method} {case.path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(case.content)}\r\n"
    )
    await raw.stream.send_all(head.encode() + b"connection: close\r\n\r\n" + case.content)
    with trio.fail_after(5):
        while data := await raw.stream.receive_some(65536):
            raw.received += data
    head_bytes, _, body = raw.received.partition(b"\r\n\r\n")
    assert head_bytes.split(b" ")[1] == str(case.status).encode()
    error = json.loads(body)["error"]
    if "(ollama)" in case.name:
        assert isinstance(error, str)
        message = error
    else:
        assert error["code"] == case.code
        message = error["message"]
    assert case.says in message
    allow = [v for k, _, v in (line.partition(b": ") for line in head_bytes.split(b"\r\n"))
             if k.lower() == b"allow"]  # fmt: skip
    assert allow == ([case.allow.encode()] if case.allow else [])
    assert mock.stats["requests"] == 0


async def test_ollama_routes_answer_the_gateways_errors_in_ollamas_shape(
    start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(f"http://127.0.0.1:{_closed_port()}", retries=0)
    unreachable = await client.post(f"{gateway}/api/chat", json=chat())
    assert unreachable.status_code == 502
    assert "failed while connecting: connection refused by" in _ollama_error(unreachable)
    not_served = await client.post(f"{gateway}/api/generate", json={"model": "x", "prompt": "y"})
    # The only backend's circuit may have opened by now: 503 then, else 502.
    assert not_served.status_code in (502, 503)
    _ollama_error(not_served)
    same_on_openai = await client.post(f"{gateway}/v1/chat/completions", json=chat())
    assert _error(same_on_openai)["code"] in ("backend_unreachable", "no_healthy_backend")


async def test_body_over_the_limit_is_413_before_it_is_read(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock(), max_request_body=1000)
    response = await client.post(f"{gateway}/v1/chat/completions", json=chat("x" * 2000))
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"


async def test_chunked_body_over_the_limit_is_413_while_reading(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock(), max_request_body=1000)

    async def body() -> object:
        for _ in range(100):
            yield b"x" * 100

    response = await client.post(f"{gateway}/v1/chat/completions", content=body())
    assert response.status_code == 413


async def test_body_that_trickles_in_is_408(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway(mock, body_timeout=0.3)
    raw = await RawClient.connect(gateway)
    await raw.send_request("POST", "/v1/chat/completions", chat(), body_bytes_to_send=5)
    received = await raw.read_until(b"}}", timeout=5)
    assert received.startswith(b"HTTP/1.1 408")
    assert mock.stats["requests"] == 0


async def test_unreachable_backend_is_502(
    start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(f"http://127.0.0.1:{_closed_port()}")
    response = await client.post(f"{gateway}/v1/chat/completions", json=chat())
    assert response.status_code == 502
    assert _error(response)["code"] == "backend_unreachable"
    assert pool_totals(await status(client, gateway))["in_use"] == 0


async def test_no_first_byte_in_time_is_504_and_closes_upstream(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway(mock, first_byte_timeout=0.3)
    response = await client.post(
        f"{gateway}/v1/chat/completions", json=chat(), headers={"x-mock-hang": "1"}
    )
    assert response.status_code == 504
    error = _error(response)
    assert error["code"] == "backend_timeout"
    assert error["message"] == "Backend backend-0 sent no response: timed out after 0.3 s"
    last_error = (await status(client, gateway))["backends"][0]["last_error"]
    assert last_error == error["message"]
    # The gateway gave up on the backend, so it closed the upstream: generation stops.
    await wait_until(lambda: mock.stats["client_disconnects"] == 1, timeout=2)


async def test_idle_stream_ends_with_an_sse_error_event(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=5, token_delay=2.0)
    gateway = await start_gateway(mock, idle_timeout=0.3)
    response = await client.post(f"{gateway}/v1/chat/completions", json=chat())
    assert response.status_code == 200
    events = sse_events(response.content)
    assert events[-1].startswith(b"event: error\ndata: ")
    error = json.loads(events[-1].split(b"data: ", 1)[1])["error"]
    assert error["code"] == "backend_idle_timeout"
    assert b"[DONE]" not in response.content


async def test_stream_broken_mid_way_ends_with_an_error_not_a_clean_end(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock(tokens=20))
    response = await client.post(
        f"{gateway}/v1/chat/completions", json=chat(), headers={"x-mock-drop-after": "3"}
    )
    events = sse_events(response.content)
    assert events[-1].startswith(b"event: error")
    assert (
        json.loads(events[-1].split(b"data: ", 1)[1])["error"]["code"]
        == "backend_connection_broken"
    )


async def test_ndjson_stream_broken_mid_way_ends_with_an_error_line(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock(tokens=20))
    response = await client.post(
        f"{gateway}/api/chat", json=chat(), headers={"x-mock-drop-after": "3"}
    )
    last = json.loads(response.content.splitlines()[-1])
    # Ollama's own shape: its clients raise with this message.
    assert last == {"error": "Backend backend-0 closed the connection while streaming the response"}


async def test_broken_non_streaming_body_is_an_error_for_the_client(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock(tokens=20))
    # Where the body has no framing of its own, the connection is aborted: httpx must raise.
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(
            f"{gateway}/v1/completions",
            json={"model": "mock-llm", "prompt": "x", "stream": False},
            headers={"x-mock-drop-after": "0", "x-mock-tokens": "20000"},
        )


async def test_backend_errors_are_forwarded_as_the_backend_sent_them(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock())
    response = await client.post(
        f"{gateway}/v1/chat/completions", json=chat(), headers={"x-mock-status": "400"}
    )
    assert response.status_code == 400
    assert _error(response)
    assert response.headers["x-ntonix-backend"] == "backend-0"


async def test_gateway_routes(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    gateway = await start_gateway(await start_mock())
    assert (await client.get(f"{gateway}/ntonix/health")).status_code == 200
    # Ready once the backend has answered its first probe.
    await eventually(lambda: answers_200(client, f"{gateway}/ntonix/ready"))
    snapshot = await status(client, gateway)
    assert snapshot["backends"][0]["name"] == "backend-0"
    assert snapshot["backends"][0]["state"] == "closed"


async def test_the_ollama_client_shows_the_gateways_message_not_an_object(
    start_mock: StartMock, start_gateway: StartGateway
) -> None:
    refused = await start_gateway(f"http://127.0.0.1:{_closed_port()}", retries=0)
    broken = await start_gateway(await start_mock(tokens=20))
    messages = [{"role": "user", "content": "Hello"}]

    def chat_with(host: str, *, stream: bool, **headers: str) -> None:
        answer = ollama.Client(host=host, headers=headers).chat(
            model="mock-llm", messages=messages, stream=stream
        )
        if stream:
            for _ in answer:
                pass

    with pytest.raises(ollama.ResponseError) as before_commit:
        await trio.to_thread.run_sync(partial(chat_with, refused, stream=False))
    assert before_commit.value.status_code == 502
    assert before_commit.value.error.startswith(
        "Backend backend-0 failed while connecting: connection refused by 127.0.0.1:"
    )
    with pytest.raises(ollama.ResponseError) as mid_stream:
        await trio.to_thread.run_sync(
            partial(chat_with, broken, stream=True, **{"x-mock-drop-after": "3"})
        )
    assert str(mid_stream.value).startswith(
        "Backend backend-0 closed the connection while streaming the response"
    )
