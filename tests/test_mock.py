"""The mock LLM backend (SPEC section 5), over real sockets, in both server modes."""

import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio

from mocks import MockLLM, MockOptions, serve_mock
from mocks.fin_clock import FinClock
from mocks.fin_packets import open_tap
from mocks.load import run_load
from tests.support import RawClient

CHAT = {"model": "mock-llm", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
PROMPT = {"model": "mock-llm", "prompt": "Why is the sky blue?"}
PINNED = {"temperature": 0}


@attrs.frozen
class Running:
    mock: MockLLM
    url: str


StartMock = Callable[..., Awaitable[Running]]


@pytest.fixture(params=["hypercorn", "lean"])
def lean(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "lean")


@pytest.fixture
def start_mock(nursery: trio.Nursery, lean: bool) -> StartMock:
    """Start a mock on a free port; fast by default (4 tokens, no delays)."""

    async def start(rng: random.Random | None = None, **options: Any) -> Running:
        mock = MockLLM(
            MockOptions(**{"tokens": 4, "token_delay": 0, "ttft": 0, **options}), rng=rng
        )
        port = await nursery.start(partial(serve_mock, mock, lean=lean))
        return Running(mock, f"http://127.0.0.1:{port}")

    return start


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


def sse_events(body: bytes) -> list[bytes]:
    """The data of each SSE event; every event must be one `data:` line."""
    *events, rest = body.split(b"\n\n")
    assert rest == b""
    assert all(event.startswith(b"data: ") for event in events)
    return [event.removeprefix(b"data: ") for event in events]


def ndjson_lines(body: bytes) -> list[dict[str, Any]]:
    assert body.endswith(b"\n")
    return [json.loads(line) for line in body.splitlines()]


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll an in-process condition; the caller's fail_after bounds it."""
    while not condition():
        await trio.sleep(0.001)


async def test_chat_stream_is_sse_with_role_tokens_stop_usage_and_done(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock(tokens=3)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post(f"{running.url}/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in response.headers
    *events, done = sse_events(response.content)
    assert done == b"[DONE]"
    chunks = [json.loads(event) for event in events]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    role, *tokens, stop, usage = chunks
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [len(token["choices"][0]["delta"]["content"]) > 0 for token in tokens] == [True] * 3
    assert stop["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 3


async def test_completion_stream_sends_text_chunks_then_stop(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock(tokens=2)
    response = await client.post(f"{running.url}/v1/completions", json={**PROMPT, "stream": True})
    *events, done = sse_events(response.content)
    assert done == b"[DONE]"
    chunks = [json.loads(event) for event in events]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, "stop"]


async def test_stream_chunks_arrive_as_they_are_generated(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock(tokens=5, ttft=0.03, token_delay=0.03)
    arrivals = []
    started = trio.current_time()
    body = {**CHAT, "stream": True}
    async with client.stream("POST", f"{running.url}/v1/chat/completions", json=body) as response:
        async for _ in response.aiter_raw():
            arrivals.append(trio.current_time())
    # Generation takes ttft + 4 token delays = 0.15 s; the role chunk comes at once.
    assert arrivals[0] - started < 0.1
    assert arrivals[-1] - arrivals[0] >= 0.1
    assert len(arrivals) >= 6


@pytest.mark.parametrize(
    ("path", "field"), [("/api/chat", "message"), ("/api/generate", "response")]
)
async def test_ollama_streams_ndjson_lines_ending_with_done(
    start_mock: StartMock, client: httpx.AsyncClient, path: str, field: str
) -> None:
    running = await start_mock(tokens=3)
    response = await client.post(f"{running.url}{path}", json={**CHAT, **PROMPT})
    assert response.headers["content-type"] == "application/x-ndjson"
    *tokens, last = ndjson_lines(response.content)
    assert len(tokens) == 3
    assert all(line["done"] is False and field in line and "created_at" in line for line in tokens)
    assert last["done"] is True
    assert last["done_reason"] == "stop"
    assert last["eval_count"] == 3
    assert last["total_duration"] >= last["eval_duration"] >= 0


async def test_non_streaming_answers_are_one_json_body_with_usage(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock(tokens=3)
    chat = (await client.post(f"{running.url}/v1/chat/completions", json=CHAT)).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert chat["usage"]["completion_tokens"] == 3
    text = (await client.post(f"{running.url}/v1/completions", json=PROMPT)).json()
    assert text["object"] == "text_completion"
    assert text["usage"]["total_tokens"] == text["usage"]["prompt_tokens"] + 3
    ollama = await client.post(f"{running.url}/api/chat", json={**CHAT, "stream": False})
    assert ollama.headers["content-type"] == "application/json"
    assert ollama.json()["done"] is True
    assert ollama.json()["message"]["content"]


async def test_streamed_and_whole_answers_say_the_same(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock()
    url = f"{running.url}/v1/chat/completions"
    whole = (await client.post(url, json={**CHAT, **PINNED})).json()
    streamed = await client.post(url, json={**CHAT, **PINNED, "stream": True})
    chunks = [json.loads(event) for event in sse_events(streamed.content)[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == whole["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, **PINNED}),
        ("/v1/chat/completions", {**CHAT, "seed": 7, "stream": True}),
        ("/v1/completions", {**PROMPT, **PINNED, "stream": True}),
        ("/api/chat", {**CHAT, "options": PINNED}),
        ("/api/chat", {**CHAT, **PINNED}),
        ("/api/generate", {**PROMPT, "options": {"seed": 7}, "stream": False}),
    ],
)
async def test_deterministic_requests_get_identical_bytes_from_any_node(
    start_mock: StartMock, client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    first, second = await start_mock(name="a"), await start_mock(name="b")
    answers = [
        (await client.post(f"{first.url}{path}", json=body)).content,
        (await client.post(f"{first.url}{path}", json=body)).content,
        (await client.post(f"{second.url}{path}", json=body)).content,
    ]
    assert answers[0] == answers[1] == answers[2]


async def test_sampled_requests_vary_unless_seeded(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock(tokens=8)
    url = f"{running.url}/v1/chat/completions"
    sampled = {**CHAT, "temperature": 0.7}
    assert (await client.post(url, json=sampled)).content != (
        await client.post(url, json=sampled)
    ).content
    seeded = {**sampled, "seed": 3}
    assert (await client.post(url, json=seeded)).content == (
        await client.post(url, json=seeded)
    ).content


async def test_different_prompts_get_different_answers(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock(tokens=8)
    url = f"{running.url}/v1/chat/completions"
    answers = set()
    for question in ["Why is the sky blue?", "Why is the sea blue?", "What is a cat?"]:
        body = {**CHAT, **PINNED, "messages": [{"role": "user", "content": question}]}
        answers.add((await client.post(url, json=body)).json()["choices"][0]["message"]["content"])
    assert len(answers) == 3


async def test_header_overrides_set_tokens_and_max_tokens_truncates(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock()
    url = f"{running.url}/v1/chat/completions"
    long = await client.post(url, json=CHAT, headers={"x-mock-tokens": "9"})
    assert long.json()["usage"]["completion_tokens"] == 9
    short = (await client.post(url, json={**CHAT, "max_tokens": 2})).json()
    assert short["usage"]["completion_tokens"] == 2
    assert short["choices"][0]["finish_reason"] == "length"
    bad = await client.post(url, json=CHAT, headers={"x-mock-ttft": "soon"})
    assert bad.status_code == 400
    assert "x-mock-ttft" in bad.json()["error"]["message"]


async def test_status_override_answers_an_openai_style_error(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock()
    response = await client.post(
        f"{running.url}/v1/chat/completions", json=CHAT, headers={"x-mock-status": "503"}
    )
    assert response.status_code == 503
    assert response.json() == {
        "error": {"message": "x-mock-status: 503", "type": "ServiceUnavailableError", "code": 503}
    }
    assert response.headers["x-mock-name"] == "mock"


@pytest.mark.parametrize("stream", [True, False])
async def test_drop_after_breaks_the_body(
    start_mock: StartMock, client: httpx.AsyncClient, stream: bool
) -> None:
    running = await start_mock()
    url = f"{running.url}/v1/chat/completions"
    headers = {"x-mock-drop-after": "2" if stream else "0"}
    with pytest.raises(httpx.TransportError):
        await client.post(url, json={**CHAT, "stream": stream}, headers=headers)
    assert running.mock.stats()["dropped"] == 1
    assert running.mock.stats()["completed"] == 0


async def test_hanging_request_counts_the_client_disconnect_at_once(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock()
    headers = {"x-mock-hang": "1", "x-request-id": "gone-1"}
    with pytest.raises(httpx.ReadTimeout):
        await client.post(
            f"{running.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=0.1
        )
    left_at = time.time()
    with trio.fail_after(1):
        await wait_for(lambda: running.mock.stats()["client_disconnects"] == 1)
    stats = running.mock.stats()
    assert stats["disconnects"][0]["request_id"] == "gone-1"
    assert stats["disconnects"][0]["at"] - left_at < 0.05
    assert (stats["active"], stats["completed"]) == (0, 0)


async def test_client_leaving_mid_stream_is_noticed_between_tokens(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock(tokens=100, token_delay=0.5)
    body = {**CHAT, "stream": True}
    async with client.stream("POST", f"{running.url}/v1/chat/completions", json=body) as response:
        async for _ in response.aiter_raw():
            break  # the role chunk came; leave while the mock waits for its first token
    left_at = time.time()
    with trio.fail_after(1):
        await wait_for(lambda: running.mock.stats()["client_disconnects"] == 1)
    assert running.mock.stats()["disconnects"][0]["at"] - left_at < 0.05


async def test_the_lean_mock_times_a_close_apart_from_its_busy_loop(nursery: trio.Nursery) -> None:
    mock = MockLLM(MockOptions(tokens=100, token_delay=0.5))
    port = await nursery.start(partial(serve_mock, mock, lean=True))
    raw = await RawClient.connect(f"http://127.0.0.1:{port}")
    await raw.send_request("POST", "/v1/chat/completions", {**CHAT, "stream": True})
    await raw.read_until(b'"role"')  # leave while the mock waits for its first token
    left_at = await raw.hang_up()
    # The mock's loop (this one) is held busy: it notices late, the close is timed apart.
    time.sleep(0.2)  # noqa: ASYNC251 - blocking the loop is the point
    with trio.fail_after(1):
        await wait_for(lambda: mock.stats()["client_disconnects"] == 1)
    [gone] = mock.stats()["disconnects"]
    assert abs(gone["closed_at"] - left_at) < 0.05  # `hang_up` takes its time after the close
    assert gone["at"] - left_at >= 0.2


async def test_stats_count_requests_paths_and_headers_and_reset(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock()
    await client.post(f"{running.url}/v1/chat/completions", json=CHAT, headers={"x-test": "yes"})
    await client.get(f"{running.url}/v1/models", headers={"x-probe": "1"})
    stats = (await client.get(f"{running.url}/mock/stats")).json()
    assert stats == running.mock.stats()
    assert (stats["requests"], stats["active"], stats["completed"]) == (1, 0, 1)
    assert stats["by_path"] == {"/v1/chat/completions": 1, "/v1/models": 1}
    assert stats["last_headers"]["x-probe"] == "1"
    assert "x-test" not in stats["last_headers"]
    await client.delete(f"{running.url}/mock/stats")
    stats = running.mock.stats()
    assert (stats["requests"], stats["completed"], stats["by_path"]) == (0, 0, {})


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/chat/completions", json.dumps({**CHAT, "model": "gpt-9"}), 404),
        ("POST", "/api/generate", json.dumps({**PROMPT, "model": "gpt-9"}), 404),
        ("GET", "/v1/embeddings", "", 404),
        ("POST", "/v1/chat/completions", "{not json", 400),
        ("POST", "/v1/chat/completions", json.dumps({"messages": []}), 400),
        ("GET", "/v1/chat/completions", "", 405),
    ],
)
async def test_bad_requests_get_openai_style_errors(
    start_mock: StartMock,
    client: httpx.AsyncClient,
    method: str,
    path: str,
    content: str,
    status: int,
) -> None:
    running = await start_mock()
    response = await client.request(method, f"{running.url}{path}", content=content)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "code"}


async def test_listings_name_the_configured_models(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    running = await start_mock(models=("llama3", "qwen"))
    openai = (await client.get(f"{running.url}/v1/models")).json()
    assert [model["id"] for model in openai["data"]] == ["llama3", "qwen"]
    ollama = (await client.get(f"{running.url}/api/tags")).json()
    assert [model["name"] for model in ollama["models"]] == ["llama3", "qwen"]
    assert (await client.get(f"{running.url}/health")).status_code == 200
    assert (await client.get(f"{running.url}/")).text == "Ollama is running"


async def test_fail_rate_draws_from_the_injected_rng(
    start_mock: StartMock, client: httpx.AsyncClient
) -> None:
    statuses = []
    for _ in range(2):
        running = await start_mock(fail_rate=0.5, rng=random.Random(5))
        url = f"{running.url}/v1/chat/completions"
        statuses.append([(await client.post(url, json=CHAT)).status_code for _ in range(12)])
    assert statuses[0] == statuses[1]
    assert set(statuses[0]) == {200, 500}


async def test_load_generator_counts_what_the_mock_completed(start_mock: StartMock) -> None:
    running = await start_mock()
    url = f"{running.url}/v1/chat/completions"
    result = await run_load(url, body=json.dumps(CHAT).encode(), connections=4, seconds=0.2)
    assert result.failed == 0
    # Counted before its last chunk went out, so no answer the client saw is missing.
    assert result.ok == running.mock.stats()["completed"] > 0


@pytest.mark.parametrize("mode", [[], ["--lean"]], ids=["hypercorn", "lean"])
async def test_command_prints_its_address_and_exits_cleanly_on_sigterm(
    nursery: trio.Nursery, mode: list[str]
) -> None:
    command = [sys.executable, "-m", "mocks.llm", "--port", "0", "--name", "n1", *mode]
    run = partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
    process: trio.Process = await nursery.start(run)
    assert process.stdout is not None
    line = b""
    with trio.fail_after(10):
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1)
    assert line.startswith(b"mock n1 listening on http://127.0.0.1:")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{line.decode().split()[-1]}/health")).status_code == 200
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(5):
        assert await process.wait() == 0
    assert await process.stdout.receive_some() == b""  # that one line was all


async def test_the_lean_mock_times_a_close_with_the_kernels_clock_while_it_holds_the_gil(
    nursery: trio.Nursery,
) -> None:
    if open_tap(0) is None:
        pytest.skip("the kernel clock needs CAP_NET_RAW")
    mock = MockLLM(MockOptions(tokens=100, token_delay=0.5))
    port = await nursery.start(partial(serve_mock, mock, lean=True))
    raw = await RawClient.connect(f"http://127.0.0.1:{port}")
    await raw.send_request("POST", "/v1/chat/completions", {**CHAT, "stream": True})
    await raw.read_until(b'"role"')
    await trio.sleep(0.01)  # the mock's watcher is waiting for the close
    left_at = await raw.hang_up()
    # A thread woken by the close could not note its time before this loop lets go of the GIL.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        busy_until = time.perf_counter() + 0.1
        while time.perf_counter() < busy_until:
            pass
    finally:
        sys.setswitchinterval(switch_interval)
    with trio.fail_after(1):
        await wait_for(lambda: mock.stats()["client_disconnects"] == 1)
    [gone] = mock.stats()["disconnects"]
    assert gone["clock"] == "kernel"
    assert abs(gone["closed_at"] - left_at) < 0.005


def test_the_fin_tap_stamps_closes_and_resets_to_its_port_alone() -> None:
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    tap = open_tap(servers[0].getsockname()[1])
    if tap is None:
        pytest.skip("the kernel clock needs CAP_NET_RAW")
    try:
        stamps = {}
        for server, unread in [(servers[0], b""), (servers[0], b"x"), (servers[1], b"")]:
            client = socket.create_connection(server.getsockname())
            accepted, _ = server.accept()
            accepted.sendall(unread)  # left unread, the client's close is a reset
            stamps[client.getsockname()] = time.time()
            client.close()
            accepted.close()
        closes = tap.drain()
        deadline = time.monotonic() + 1
        while len(closes) < 2 and time.monotonic() < deadline:
            closes += tap.drain()
    finally:
        tap.close()
        for server in servers:
            server.close()
    assert [peer for peer, _ in closes] == list(stamps)[:2]  # the third went to another port
    for peer, at in closes:
        assert 0 <= at - stamps[peer] < 0.005


def test_the_fin_clock_forgets_a_connection_whose_close_it_has_not_read_yet() -> None:
    """`forget` reads the queued closes first (they are this connection's): the one of the
    connection being forgotten among them, as a client's close right before the mock's own."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    clock = FinClock()
    clock.listen(port)
    accepted = None
    try:
        if clock._taps[port] is None:
            pytest.skip("the kernel clock needs CAP_NET_RAW")
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        sock = trio.socket.from_stdlib_socket(accepted)
        clock.watch(sock)
        client.close()
        accepted.settimeout(1)
        assert accepted.recv(1) == b""  # the FIN has passed the tap
        clock.forget(sock)
        assert clock.closed_at(sock) is None
    finally:
        clock.unlisten(port)
        server.close()
        if accepted is not None:
            accepted.close()
