"""Which backend gets a request: strategies, models and admission, seen from the client.

Each test runs real mocks behind a real gateway and reads `x-ntonix-backend` (which backend
answered), the mocks' own counters and /ntonix/status. Spec: SPEC sections 2-4, issue 3.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
import pytest
import trio

from ntonix.config import (
    BackendSettings,
    BalancerSettings,
    Config,
    GatewaySettings,
    HealthSettings,
)
from tests.conftest import RunningMock, StartGatewayWith, StartMock
from tests.support import (
    FAST_HEALTH,
    QUIET_HEALTH,
    RawClient,
    backend_status,
    chat,
    queued,
    wait_for_backend,
    wait_for_queued,
    wait_until,
)

CHAT = "/v1/chat/completions"


def _backend(mock: RunningMock, name: str, **settings: object) -> BackendSettings:
    return BackendSettings(name=name, url=mock.url, **settings)  # type: ignore[arg-type]


def _config(
    *backends: BackendSettings,
    strategy: str = "least-connections",
    health: HealthSettings = QUIET_HEALTH,
    **gateway: float,
) -> Config:
    return Config(
        backends=backends,
        gateway=GatewaySettings(**gateway),  # type: ignore[arg-type]
        balancer=BalancerSettings(strategy=strategy),
        health=health,
    )


async def _answered_by(client: httpx.AsyncClient, gateway: str, payload: object) -> str:
    response = await client.post(f"{gateway}{CHAT}", json=payload)
    assert response.status_code == 200, response.text
    return response.headers["x-ntonix-backend"]


async def _instant_mock(start_mock: StartMock, name: str, **options: object) -> RunningMock:
    """A mock that answers at once: hundreds of requests take a second."""
    return await start_mock(name, ttft=0, token_delay=0, tokens=1, **options)


class HeldStream:
    """A streaming response the test keeps open, read slowly in the background."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.backend = response.headers["x-ntonix-backend"]
        self.body = b""
        self.done = trio.Event()  # the whole body arrived
        self.closed = False  # the client hung up
        self._reading = trio.CancelScope()
        self._stopped = trio.Event()

    async def read_slowly(self, pause: float = 0.05) -> None:
        try:
            with self._reading:
                async for chunk in self.response.aiter_raw():
                    self.body += chunk
                    await trio.sleep(pause)
                self.done.set()
        finally:
            self._stopped.set()

    async def hang_up(self) -> None:
        """The client leaves: its connection closes and the gateway lets go of the upstream."""
        self.closed = True
        self._reading.cancel()
        await self._stopped.wait()
        await self.response.aclose()


@asynccontextmanager
async def held_streams(client: httpx.AsyncClient, gateway: str) -> AsyncIterator[StreamOpener]:
    """Open streams with the opener it yields; leaving the block hangs up on those still open."""
    async with trio.open_nursery() as nursery:
        opener = StreamOpener(client, gateway, nursery)
        try:
            yield opener
        finally:
            for stream in opener.streams:
                await stream.hang_up()


class StreamOpener:
    def __init__(self, client: httpx.AsyncClient, gateway: str, nursery: trio.Nursery) -> None:
        self._client = client
        self._gateway = gateway
        self._nursery = nursery
        self.streams: list[HeldStream] = []

    async def open(self, payload: object, headers: dict[str, str] | None = None) -> HeldStream:
        """Send a streaming request; return once its response head has arrived."""
        client = self._client
        request = client.build_request(
            "POST", f"{self._gateway}{CHAT}", json=payload, headers=headers
        )
        response = await client.send(request, stream=True)
        assert response.status_code == 200
        stream = HeldStream(response)
        self.streams.append(stream)
        self._nursery.start_soon(stream.read_slowly)
        return stream


# --- weighted-round-robin -------------------------------------------------------------------


async def test_weighted_round_robin_splits_400_requests_3_to_1(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    heavy = await _instant_mock(start_mock, "heavy")
    light = await _instant_mock(start_mock, "light")
    gateway = await start_gateway_with(
        _config(
            _backend(heavy, "heavy", weight=3),
            _backend(light, "light", weight=1),
            strategy="weighted-round-robin",
        )
    )
    answered: Counter[str] = Counter()

    async def worker(count: int) -> None:
        for index in range(count):
            answered[await _answered_by(client, gateway, chat(f"q{index}", stream=False))] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(worker, 50)

    assert sum(answered.values()) == 400
    assert abs(answered["heavy"] - 300) <= 300 * 0.05
    assert abs(answered["light"] - 100) <= 100 * 0.05
    # The header tells the truth: the mocks saw the same split.
    assert (heavy.stats["requests"], light.stats["requests"]) == (
        answered["heavy"],
        answered["light"],
    )


async def test_weighted_round_robin_interleaves_smoothly_like_nginx(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    a, b, c = [await _instant_mock(start_mock, name) for name in "abc"]
    gateway = await start_gateway_with(
        _config(
            _backend(a, "a", weight=5),
            _backend(b, "b", weight=1),
            _backend(c, "c", weight=1),
            strategy="weighted-round-robin",
        )
    )
    order = [await _answered_by(client, gateway, chat(stream=False)) for _ in range(14)]
    # nginx's smooth WRR, not a a a a a b c; and the cycle repeats.
    assert "".join(order) == "aabacaa" * 2


# --- least-connections ----------------------------------------------------------------------


async def test_least_connections_sends_new_requests_away_from_a_backend_busy_with_streams(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    a = await start_mock("a", tokens=400, token_delay=0.05)
    b = await start_mock("b", tokens=400, token_delay=0.05)
    gateway = await start_gateway_with(_config(_backend(a, "a"), _backend(b, "b")))
    async with held_streams(client, gateway) as streams:
        # Four long streams share the two idle backends; the client then leaves those on b,
        # which pins two long streams on a.
        for index in range(4):
            await streams.open(chat(f"long {index}"))
        assert Counter(s.backend for s in streams) == {"a": 2, "b": 2}
        for stream in streams:
            if stream.backend == "b":
                await (stream)
        await wait_for_backend(client, gateway, "b", lambda r: r["active_requests"] == 0)
        assert (await backend_status(client, gateway, "a"))["active_requests"] == 2  # type: ignore[index]

        short = {"x-mock-tokens": "2"}
        for index in range(6):
            response = await client.post(
                f"{gateway}{CHAT}", json=chat(f"short {index}", stream=False), headers=short
            )
            assert response.headers["x-ntonix-backend"] == "b"
        # One more stream on b still leaves it the less loaded one.
        await streams.open(chat("long on b"))
        assert streams[-1].backend == "b"
        assert await _answered_by(client, gateway, chat("after", stream=False)) == "b"
        assert all(not s.done.is_set() for s in streams if not s.closed)


# --- prefix-affinity ------------------------------------------------------------------------

SYSTEM_PROMPT = "You are a careful assistant for the ACME support desk. " * 6  # > 256 chars


def _with_system_prompt(system: str, question: str) -> dict[str, object]:
    return {
        **chat(stream=False),
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }


async def test_prefix_affinity_sends_a_shared_prompt_prefix_to_one_backend(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mocks = [await _instant_mock(start_mock, name) for name in ("a", "b", "c")]
    gateway = await start_gateway_with(
        _config(*(_backend(m, n) for m, n in zip(mocks, "abc", strict=True)),
                strategy="prefix-affinity")
    )  # fmt: skip
    assert len(SYSTEM_PROMPT) > 256
    same_prefix = {
        await _answered_by(client, gateway, _with_system_prompt(SYSTEM_PROMPT, f"question {i}"))
        for i in range(12)
    }
    assert len(same_prefix) == 1  # the backend's prefix cache gets every one of them

    # Prompts that differ within their first 256 characters spread over the backends.
    spread = Counter(
        [
            await _answered_by(client, gateway, _with_system_prompt(f"Tenant {i}. ", "hello"))
            for i in range(30)
        ]
    )
    assert set(spread) == {"a", "b", "c"}


async def test_prefix_affinity_spills_a_hot_prefix_instead_of_overloading_its_home(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mocks = [await start_mock(name, tokens=400, token_delay=0.05) for name in "abc"]
    gateway = await start_gateway_with(
        _config(*(_backend(m, n) for m, n in zip(mocks, "abc", strict=True)),
                strategy="prefix-affinity")
    )  # fmt: skip
    hot = {**_with_system_prompt(SYSTEM_PROMPT, "same question"), "stream": True}
    count = 6
    async with held_streams(client, gateway) as streams:
        for _ in range(count):
            await streams.open(hot)
        placed = Counter(stream.backend for stream in streams)
    # Bounded loads (factor 1.25): no node holds more than ceil(1.25 * average).
    assert len(placed) >= 2
    assert max(placed.values()) <= math.ceil(1.25 * count / 3)


# --- model-aware routing --------------------------------------------------------------------


@attrs.frozen
class ModelCase:
    model: str
    status: int
    answered_by: frozenset[str] = frozenset()
    code: str | None = None


MODEL_CASES = [
    # "beta" is in b's config; "alpha" was learned from a's /v1/models by the probe.
    ModelCase("beta", 200, frozenset({"b"})),
    ModelCase("alpha", 200, frozenset({"a"})),
    ModelCase("shared", 200, frozenset({"a", "b"})),
    ModelCase("nobody-serves-this", 404, code="model_not_found"),
    # Only c serves gamma, and c is down.
    ModelCase("gamma", 503, code="no_healthy_backend"),
]


async def test_requests_go_only_to_backends_that_serve_their_model(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    a = await _instant_mock(start_mock, "a", models=("alpha", "shared"))
    b = await _instant_mock(start_mock, "b", models=("beta", "shared"))
    down = _closed_port_url()
    gateway = await start_gateway_with(
        _config(
            _backend(a, "a"),  # models learned from its probe
            _backend(b, "b", models=("beta", "shared")),
            BackendSettings(name="c", url=down, models=("gamma",)),
            health=FAST_HEALTH,
        )
    )
    await wait_for_backend(client, gateway, "a", lambda r: r["models"] == ["alpha", "shared"])
    await wait_for_backend(client, gateway, "c", lambda r: r["state"] == "open")

    for case in MODEL_CASES:
        seen = set()
        for index in range(6):
            response = await client.post(
                f"{gateway}{CHAT}", json=chat(f"q{index}", stream=False, model=case.model)
            )
            assert response.status_code == case.status, (case, response.text)
            if case.code is not None:
                assert response.json()["error"]["code"] == case.code
            if case.status == 503:
                assert int(response.headers["retry-after"]) >= 1
            if case.status == 200:
                seen.add(response.headers["x-ntonix-backend"])
        assert seen == case.answered_by, case
    assert a.stats["by_path"][CHAT] + b.stats["by_path"][CHAT] == 6 * 3


async def test_model_lists_are_the_union_over_healthy_backends(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    a = await _instant_mock(start_mock, "a", models=("alpha", "shared"))
    b = await _instant_mock(start_mock, "b", models=("beta", "shared"))
    gateway = await start_gateway_with(
        _config(
            _backend(a, "a"),
            _backend(b, "b", models=("beta", "shared")),
            BackendSettings(name="c", url=_closed_port_url(), models=("gamma",)),
            health=FAST_HEALTH,
        )
    )
    await wait_for_backend(client, gateway, "a", lambda r: r["models"] == ["alpha", "shared"])
    await wait_for_backend(client, gateway, "c", lambda r: r["state"] == "open")

    openai = await client.get(f"{gateway}/v1/models")
    assert openai.status_code == 200
    assert openai.json()["object"] == "list"
    assert [m["id"] for m in openai.json()["data"]] == ["alpha", "beta", "shared"]
    ollama = await client.get(f"{gateway}/api/tags")
    assert ollama.status_code == 200
    assert [m["name"] for m in ollama.json()["models"]] == ["alpha", "beta", "shared"]


def _closed_port_url() -> str:
    """A URL where nothing listens: connections are refused at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# --- admission and back-pressure ------------------------------------------------------------


async def _gateway_with_one_slot_pair(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, **gateway: float
) -> tuple[RunningMock, str]:
    mock = await start_mock("only", tokens=400, token_delay=0.05)
    url = await start_gateway_with(_config(_backend(mock, "only", max_concurrent=2), **gateway))
    return mock, url


async def test_a_full_backend_queues_requests_first_come_first_served(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock, gateway = await _gateway_with_one_slot_pair(start_mock, start_gateway_with)
    finished: list[str] = []

    async def short_request(name: str) -> None:
        response = await client.post(
            f"{gateway}{CHAT}", json=chat(name), headers={"x-mock-tokens": "3"}
        )
        assert response.status_code == 200
        assert response.content.endswith(b"data: [DONE]\n\n")
        finished.append(name)

    async with held_streams(client, gateway) as streams:
        for index in range(2):
            await streams.open(chat(f"long {index}"))
        async with trio.open_nursery() as waiting:
            for position, name in enumerate(["first", "second", "third"], start=1):
                waiting.start_soon(short_request, name)
                await wait_for_queued(client, gateway, position)
            assert mock.stats["requests"] == 2  # the queued ones have not reached the backend
            # One long stream ends: the freed slot serves the queue in arrival order.
            await (streams[0])
        assert finished == ["first", "second", "third"]
        assert await queued(client, gateway) == 0
        assert not streams[1].done.is_set()  # the other slot stayed busy all along


async def test_a_request_queued_past_queue_timeout_gets_503_with_retry_after(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock, gateway = await _gateway_with_one_slot_pair(
        start_mock, start_gateway_with, queue_timeout=0.3
    )
    async with held_streams(client, gateway) as streams:
        for index in range(2):
            await streams.open(chat(f"long {index}"))
        response = await client.post(f"{gateway}{CHAT}", json=chat("third"))
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "backends_busy"
        assert await queued(client, gateway) == 0
        assert mock.stats["requests"] == 2


async def test_a_client_that_leaves_the_queue_is_gone_at_once_and_never_reaches_the_backend(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock, gateway = await _gateway_with_one_slot_pair(start_mock, start_gateway_with)
    async with held_streams(client, gateway) as streams:
        for index in range(2):
            await streams.open(chat(f"long {index}"))
        raw = await RawClient.connect(gateway)
        await raw.send_request("POST", CHAT, chat("impatient"))
        await wait_for_queued(client, gateway, 1)
        await raw.hang_up()
        await wait_for_queued(client, gateway, 0, timeout=1)
        # Free both slots: had the impatient request stayed queued, it would go out now.
        for stream in streams:
            await (stream)
    await wait_until(lambda: mock.stats["active"] == 0)
    await trio.sleep(0.1)
    assert mock.stats["requests"] == 2
    assert (await backend_status(client, gateway, "only"))["active_requests"] == 0  # type: ignore[index]


async def test_max_concurrent_caps_every_backend_and_the_overflow_queues_and_completes(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mocks = [await start_mock(name, tokens=10, token_delay=0.02) for name in ("a", "b")]
    gateway = await start_gateway_with(
        _config(*(_backend(m, m.mock.options.name, max_concurrent=2) for m in mocks))
    )
    most_active = {"a": 0, "b": 0}
    most_queued = 0
    bodies: list[bytes] = []

    async def watch() -> None:
        nonlocal most_queued
        while True:
            for mock in mocks:
                name = mock.mock.options.name
                most_active[name] = max(most_active[name], mock.stats["active"])
            most_queued = max(most_queued, await queued(client, gateway))
            await trio.sleep(0.005)

    async def stream(index: int) -> None:
        response = await client.post(f"{gateway}{CHAT}", json=chat(f"stream {index}"))
        assert response.status_code == 200
        bodies.append(response.content)

    async with trio.open_nursery() as watching:
        watching.start_soon(watch)
        async with trio.open_nursery() as nursery:
            for index in range(10):
                nursery.start_soon(stream, index)
        watching.cancel_scope.cancel()

    assert len(bodies) == 10
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
    assert all(b"event: error" not in body for body in bodies)
    assert max(most_active.values()) <= 2
    assert most_queued > 0
    assert sum(mock.stats["completed"] for mock in mocks) == 10
