"""Health: failing backends are ejected and let back in, and failover hides what it can.

The circuit breaker, the 429 back-off, failover before the first byte (and never after it) and
/ntonix/ready, seen from the client, the mocks' counters and /ntonix/status. The contract:
SPEC sections 3-4 and issue 3.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import httpx
import pytest
import trio

from mocks.llm import MockLLM, MockOptions, serve_mock
from tests.conftest import RunningMock, StartGatewayWith, StartMock
from tests.support import (
    FAST_HEALTH,
    QUIET_HEALTH,
    MockProcess,
    RawClient,
    Spawn,
    SteerableMock,
    answers_200,
    backend,
    backend_status,
    chat,
    closed_port_url,
    eventually,
    gateway_config,
    spawn_mock,
    sse_events,
    wait_for_backend,
    wait_until,
)

CHAT = "/v1/chat/completions"
THRESHOLD = QUIET_HEALTH.failure_threshold
assert FAST_HEALTH.failure_threshold == THRESHOLD


def steer(mock: RunningMock) -> SteerableMock:
    assert isinstance(mock.mock, SteerableMock)
    return mock.mock


async def record(client: httpx.AsyncClient, gateway: str, name: str) -> dict[str, object]:
    found = await backend_status(client, gateway, name)
    assert found is not None, f"{name} is not in /ntonix/status"
    return found


def is_healthy(backend: dict[str, object]) -> bool:
    return backend["state"] == "closed" and backend["consecutive_failures"] == 0


# --- a crash: ejection and return ------------------------------------------------------------

# A quick lean mock: non-streaming answers take about 10 ms.
QUICK_MOCK = ("--tokens", "4", "--ttft", "0.005", "--token-delay", "0.001")


async def test_killed_backend_is_ejected_without_client_errors_and_rejoins_via_half_open_trial(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    spawn: Spawn,
    client: httpx.AsyncClient,
) -> None:
    a = await start_mock("a", tokens=4, ttft=0.005, token_delay=0.001)
    b = await start_mock("b", tokens=4, ttft=0.005, token_delay=0.001)
    c = await spawn_mock(spawn, "c", *QUICK_MOCK)
    gateway = await start_gateway_with(
        gateway_config(
            backend(a.url, "a"), backend(b.url, "b"), backend(c.url, "c"), health=FAST_HEALTH
        )
    )
    answers: list[tuple[int, str]] = []
    errors: list[str] = []

    async def steady_load(worker: int) -> None:
        for index in range(100_000):
            try:
                response = await client.post(
                    f"{gateway}{CHAT}", json=chat(f"w{worker} q{index}", stream=False)
                )
            except httpx.HTTPError as error:
                errors.append(repr(error))
                continue
            if response.status_code != 200:
                errors.append(f"{response.status_code} {response.text}")
            answers.append((response.status_code, response.headers.get("x-ntonix-backend", "")))

    def has_answered(mock: MockProcess, requests: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return (await mock.stats(client))["requests"] >= requests

        return check

    async with trio.open_nursery() as load:
        for worker in range(4):
            load.start_soon(steady_load, worker)
        await eventually(has_answered(c, 10))  # c takes its share of the load

        await c.child.kill()
        killed_at, answered_at_kill = time.monotonic(), len(answers)
        opened = await wait_for_backend(client, gateway, "c", lambda c: c["state"] == "open")
        detected_after = time.monotonic() - killed_at
        assert opened["consecutive_failures"] >= THRESHOLD
        assert opened["last_error"]
        assert any("circuit open" in reason for reason in opened["not_eligible_because"])
        # While it is dead, its half-open trials (probes or requests) fail and it stays out.
        await trio.sleep(2 * FAST_HEALTH.open_for)
        assert (await record(client, gateway, "c"))["state"] in ("open", "half-open")
        answered_while_dead = len(answers) - answered_at_kill

        # The same node comes back on the same port. Closed with no failures can only come
        # from a trial that succeeded: an open circuit ignores ordinary successes.
        restarted = await spawn_mock(spawn, "c", *QUICK_MOCK, port=c.port)
        restarted_at = time.monotonic()
        await wait_for_backend(client, gateway, "c", is_healthy, timeout=10)
        recovered_after = time.monotonic() - restarted_at
        await eventually(has_answered(restarted, 5))  # and it takes traffic again
        load.cancel_scope.cancel()

    assert errors == []  # every failure before the first byte was failed over
    assert answered_while_dead > 50
    print(f"detected in {detected_after:.3f} s, rejoined {recovered_after:.3f} s after restart")


# --- what is a failure, and what is not ----------------------------------------------------


async def test_a_backend_answering_500_is_ejected_after_failure_threshold_requests(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    failing = await start_mock("failing", fail_rate=1.0)
    good = await start_mock("good")
    gateway = await start_gateway_with(
        gateway_config(backend(failing.url, "failing"), backend(good.url, "good"))
    )
    # The start-up probe succeeds (the mock lists its models fine); let it land first.
    await wait_for_backend(client, gateway, "failing", lambda f: f["probe"] == "ok")
    for index in range(20):
        response = await client.post(f"{gateway}{CHAT}", json=chat(f"q{index}", stream=False))
        assert response.status_code == 200  # each 500 was retried on the good backend
        assert response.headers["x-ntonix-backend"] == "good"
    ejected = await record(client, gateway, "failing")
    assert ejected["state"] == "open"
    assert ejected["consecutive_failures"] == THRESHOLD
    # Exactly failure_threshold requests reached it; none once its circuit was open.
    assert failing.stats["requests"] == THRESHOLD
    assert is_healthy(await record(client, gateway, "good"))


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_4xx_answers_never_eject_a_backend_and_are_not_retried(
    status: int,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
) -> None:
    a, b = await start_mock("a"), await start_mock("b")
    gateway = await start_gateway_with(gateway_config(backend(a.url, "a"), backend(b.url, "b")))
    sent = 4 * THRESHOLD
    for index in range(sent):
        response = await client.post(
            f"{gateway}{CHAT}",
            json=chat(f"q{index}", stream=False),
            headers={"x-mock-status": str(status)},
        )
        # A context-length 400 is the client's answer, from the backend, as it sent it.
        assert response.status_code == status
        assert response.json()["error"]["code"] == status
    assert a.stats["requests"] + b.stats["requests"] == sent  # none was retried elsewhere
    for name in ("a", "b"):
        assert is_healthy(await record(client, gateway, name))
    assert (await client.get(f"{gateway}/ntonix/ready")).status_code == 200


@attrs.frozen
class Disconnect:
    """A moment at which the client hangs up."""

    name: str
    stream: bool
    headers: tuple[tuple[str, str], ...] = ()
    read_until: bytes | None = None  # hang up once this arrived; else once the mock works


DISCONNECTS = [
    Disconnect("mid-stream", stream=True, read_until=b'"content"'),
    Disconnect("waiting for the first byte", stream=True, headers=(("x-mock-hang", "1"),)),
    Disconnect("during a non-streaming answer", stream=False),
]


@pytest.mark.parametrize("moment", DISCONNECTS, ids=lambda moment: moment.name)
async def test_client_disconnects_never_eject_a_backend(
    moment: Disconnect,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
) -> None:
    mock = await start_mock("only", tokens=100, token_delay=0.02)
    gateway = await start_gateway_with(gateway_config(backend(mock.url, "only")))
    hang_ups = 2 * THRESHOLD
    for index in range(hang_ups):
        raw = await RawClient.connect(gateway)
        await raw.send_request(
            "POST", CHAT, chat(f"q{index}", stream=moment.stream), headers=dict(moment.headers)
        )
        if moment.read_until is not None:
            await raw.read_until(moment.read_until)
        else:
            await wait_until(lambda: mock.stats["active"] == 1)
        await raw.hang_up()
        await wait_until(lambda: mock.stats["active"] == 0)
    assert mock.stats["client_disconnects"] == hang_ups
    only = await record(client, gateway, "only")
    assert is_healthy(only)
    assert only["last_error"] == ""
    response = await client.post(
        f"{gateway}{CHAT}", json=chat("still there", stream=False), headers={"x-mock-tokens": "2"}
    )
    assert response.status_code == 200


# --- 429: back-pressure, not failure --------------------------------------------------------


@attrs.frozen
class Backoff:
    retry_after: str | None  # the 429's Retry-After header
    skipped_for: float  # seconds the gateway should leave the backend alone


BACKOFFS = [
    # The mock sends no Retry-After of its own: the gateway's default applies.
    Backoff(retry_after=None, skipped_for=1.0),
    Backoff(retry_after="2", skipped_for=2.0),
]


@pytest.mark.parametrize("backoff", BACKOFFS, ids=lambda b: f"retry-after={b.retry_after}")
async def test_a_429_is_retried_elsewhere_and_skips_the_backend_without_ejecting_it(
    backoff: Backoff,
    start_steerable_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
) -> None:
    busy = await start_steerable_mock("busy")
    free = await start_steerable_mock("free")
    steer(busy).forced_headers = {"x-mock-status": "429"}
    if backoff.retry_after is not None:
        steer(busy).response_headers = (("retry-after", backoff.retry_after),)
    gateway = await start_gateway_with(
        gateway_config(backend(busy.url, "busy"), backend(free.url, "free"))
    )
    sent_at = trio.current_time()
    # Least-connections tries the first of two idle backends first: busy.
    response = await client.post(f"{gateway}{CHAT}", json=chat("first", stream=False))
    assert response.status_code == 200
    assert response.headers["x-ntonix-backend"] == "free"
    assert busy.stats["requests"] == 1

    skipped = await record(client, gateway, "busy")
    assert is_healthy(skipped)  # back-pressure, not a failure
    assert any("429" in reason for reason in skipped["not_eligible_because"])
    for index in range(3):
        response = await client.post(f"{gateway}{CHAT}", json=chat(f"q{index}", stream=False))
        assert response.headers["x-ntonix-backend"] == "free"
    assert busy.stats["requests"] == 1

    steer(busy).forced_headers = {}
    await wait_for_backend(
        client, gateway, "busy", lambda b: not b["not_eligible_because"], timeout=10
    )
    assert trio.current_time() - sent_at >= backoff.skipped_for
    assert busy.stats["requests"] == 1
    answered = set()
    for index in range(4):
        response = await client.post(f"{gateway}{CHAT}", json=chat(f"r{index}", stream=False))
        assert response.status_code == 200
        answered.add(response.headers["x-ntonix-backend"])
    assert answered == {"busy", "free"}


# --- failover before the first byte, never after ------------------------------------------


@attrs.frozen
class EarlyFailure:
    """A way for a backend to fail before anything reached the client."""

    name: str
    forced_headers: tuple[tuple[str, str], ...] = ()
    refuses_connections: bool = False


EARLY_FAILURES = [
    EarlyFailure("answers 500", (("x-mock-status", "500"),)),
    EarlyFailure("answers 502", (("x-mock-status", "502"),)),
    EarlyFailure("answers 503", (("x-mock-status", "503"),)),
    EarlyFailure("hangs past first_byte_timeout", (("x-mock-hang", "1"),)),
    EarlyFailure("refuses connections", refuses_connections=True),
]


@pytest.mark.parametrize("failure", EARLY_FAILURES, ids=lambda failure: failure.name)
async def test_a_failure_before_the_first_byte_is_retried_on_another_backend(
    failure: EarlyFailure,
    start_steerable_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
) -> None:
    bad = await start_steerable_mock("bad")
    good = await start_steerable_mock("good")
    steer(bad).forced_headers = dict(failure.forced_headers)
    bad_url = closed_port_url() if failure.refuses_connections else bad.url
    gateway = await start_gateway_with(
        gateway_config(backend(bad_url, "bad"), backend(good.url, "good"), first_byte_timeout=0.3)
    )
    # Least-connections tries the first of two idle backends first: bad.
    response = await client.post(f"{gateway}{CHAT}", json=chat())
    assert response.status_code == 200
    assert response.headers["x-ntonix-backend"] == "good"
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert bad.stats["requests"] == (0 if failure.refuses_connections else 1)
    failed = await record(client, gateway, "bad")
    assert failed["consecutive_failures"] >= 1  # the start-up probe may have failed too
    assert failed["last_error"]
    # A hung backend's request is closed when the gateway gives up on it.
    await wait_until(lambda: bad.stats["active"] == 0)


@pytest.mark.parametrize("backends", [1, 2, 3])
async def test_failover_never_tries_the_same_backend_twice(
    backends: int,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
) -> None:
    mocks = {f"m{index}": await start_mock(f"m{index}", fail_rate=1.0) for index in range(backends)}
    gateway = await start_gateway_with(
        gateway_config(*(backend(mock.url, name) for name, mock in mocks.items()), retries=5)
    )
    response = await client.post(f"{gateway}{CHAT}", json=chat(stream=False))
    # Out of backends before out of retries: the last backend's own 500 reaches the client.
    assert response.status_code == 500
    assert "mock failure" in response.json()["error"]["message"]
    assert response.headers["x-ntonix-backend"] in mocks
    assert response.headers["x-mock-name"] == response.headers["x-ntonix-backend"]
    assert [mock.stats["requests"] for mock in mocks.values()] == [1] * backends


@attrs.frozen
class BrokenStream:
    path: str
    payload: dict[str, object]

    def message_of(self, body: bytes) -> str:
        """The message of the error that ends the stream: an SSE `error` event in OpenAI's
        shape, or a final NDJSON line in Ollama's (`{"error": "message"}`)."""
        if self.path == CHAT:
            last = sse_events(body)[-1]
            assert last.startswith(b"event: error\ndata: ")
            error = json.loads(last.split(b"data: ", 1)[1])["error"]
            assert error["code"] == "backend_connection_broken"
            message: str = error["message"]
            return message
        payload = json.loads(body.splitlines()[-1])
        assert set(payload) == {"error"} and isinstance(payload["error"], str)
        return str(payload["error"])


BROKEN_STREAMS = [
    BrokenStream(CHAT, chat("tell me a story")),
    BrokenStream("/api/chat", chat("tell me a story")),
]


@pytest.mark.parametrize("broken", BROKEN_STREAMS, ids=lambda broken: broken.path)
async def test_a_failure_after_the_first_byte_is_never_retried_and_ends_the_stream_with_an_error(
    broken: BrokenStream,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
) -> None:
    mocks = {name: await start_mock(name, tokens=20) for name in ("a", "b")}
    gateway = await start_gateway_with(
        gateway_config(*(backend(mock.url, name) for name, mock in mocks.items()))
    )
    response = await client.post(
        f"{gateway}{broken.path}", json=broken.payload, headers={"x-mock-drop-after": "3"}
    )
    assert response.status_code == 200  # committed before the backend broke
    message = broken.message_of(response.content)
    assert message.endswith("closed the connection while streaming the response")
    assert b"[DONE]" not in response.content
    assert b'"done":true' not in response.content
    answered = response.headers["x-ntonix-backend"]
    (other,) = set(mocks) - {answered}
    assert mocks[answered].stats["dropped"] == 1
    assert mocks[other].stats["requests"] == 0  # not replayed on a second backend
    # A stream broken mid-way is a failure of that backend.
    assert (await record(client, gateway, answered))["consecutive_failures"] == 1


# --- nobody healthy -------------------------------------------------------------------------


async def eject(
    client: httpx.AsyncClient, gateway: str, mock: RunningMock, name: str
) -> dict[str, object]:
    """Make `name` answer 500 until its circuit opens; its record then."""
    steer(mock).forced_headers = {"x-mock-status": "500"}
    for index in range(10 * THRESHOLD):
        await client.post(f"{gateway}{CHAT}", json=chat(f"eject {index}", stream=False))
        found = await record(client, gateway, name)
        if found["state"] == "open":
            return found
    raise AssertionError(f"{name} answered 500 {10 * THRESHOLD} times and is still in")


async def test_ready_is_200_while_a_backend_is_healthy_and_503_once_all_are_open(
    start_steerable_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    a, b = await start_steerable_mock("a"), await start_steerable_mock("b")
    gateway = await start_gateway_with(gateway_config(backend(a.url, "a"), backend(b.url, "b")))
    ready = f"{gateway}/ntonix/ready"
    await eventually(lambda: answers_200(client, ready))  # once the first probes have answered
    await eject(client, gateway, a, "a")
    assert (await client.get(ready)).status_code == 200
    await eject(client, gateway, b, "b")
    response = await client.get(ready)
    assert response.status_code == 503
    assert response.json() == {"ready": False}
    # Liveness is another matter: the gateway itself is fine.
    assert (await client.get(f"{gateway}/ntonix/health")).status_code == 200


async def test_not_ready_from_the_start_until_the_only_backend_has_answered(
    nursery: trio.Nursery, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    url = closed_port_url()
    gateway = await start_gateway_with(gateway_config(backend(url, "only"), health=FAST_HEALTH))
    ready = f"{gateway}/ntonix/ready"
    response = await client.get(ready)
    assert (response.status_code, response.json()) == (503, {"ready": False})
    # One probe refused: the circuit is still closed, and nothing has ever answered.
    found = await wait_for_backend(client, gateway, "only", lambda b: b["probe"] == "failing")
    assert found["state"] == "closed"
    assert (await client.get(ready)).status_code == 503
    port = int(url.rsplit(":", 1)[1])
    await nursery.start(partial(serve_mock, MockLLM(MockOptions(name="only")), port=port))
    await eventually(lambda: answers_200(client, ready))
    assert (await record(client, gateway, "only"))["probe"] == "ok"


async def test_all_backends_open_answers_503_with_retry_after_at_once(
    start_steerable_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    a, b = await start_steerable_mock("a"), await start_steerable_mock("b")
    gateway = await start_gateway_with(
        gateway_config(
            backend(a.url, "a"),
            backend(b.url, "b"),
            # Were the gateway to wait for anything, these would show.
            queue_timeout=30,
            first_byte_timeout=30,
            upstream_connect_timeout=30,
        )
    )
    await eject(client, gateway, a, "a")
    await eject(client, gateway, b, "b")
    reached = a.stats["requests"] + b.stats["requests"]
    for stream in (True, False):
        started = time.monotonic()
        response = await client.post(f"{gateway}{CHAT}", json=chat(stream=stream))
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert elapsed < 1.0  # the contract says 100 ms; generous on a busy machine
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == "no_healthy_backend"
        assert set(error) == {"message", "type", "code"}
    assert a.stats["requests"] + b.stats["requests"] == reached


async def test_ready_stays_200_while_the_only_backend_backs_off_after_a_429(
    start_steerable_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    busy = await start_steerable_mock("busy")
    steer(busy).forced_headers = {"x-mock-status": "429"}
    gateway = await start_gateway_with(gateway_config(backend(busy.url, "busy")))
    response = await client.post(f"{gateway}{CHAT}", json=chat(stream=False))
    assert response.status_code == 429  # nowhere else to go: the client gets the 429 itself
    assert is_healthy(await record(client, gateway, "busy"))  # closed, not ejected...
    ready = await client.get(f"{gateway}/ntonix/ready")
    assert ready.status_code == 200  # ...so the gateway has a healthy backend
