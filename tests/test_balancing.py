"""Which backend gets a request: strategies, models and admission, as a client sees them.

Real mocks behind a real gateway; each test reads `x-ntonix-backend` (which backend answered),
the mocks' own counters and /ntonix/status. The contract: SPEC sections 2-4 and issue 3.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import trio

from tests.conftest import RunningMock, StartGatewayWith, StartMock
from tests.support import (
    FAST_HEALTH,
    RawClient,
    backend,
    chat,
    closed_port_url,
    gateway_config,
    queued,
    wait_for_backend,
    wait_for_queued,
    wait_until,
)

CHAT = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"


async def instant_mock(start_mock: StartMock, name: str, **options: Any) -> RunningMock:
    """A mock that answers at once, so that hundreds of requests take about a second."""
    return await start_mock(name, ttft=0, token_delay=0, tokens=1, **options)


async def slow_mock(start_mock: StartMock, name: str, **options: Any) -> RunningMock:
    """A mock whose streams last 20 s unless the request says otherwise (x-mock-tokens)."""
    return await start_mock(name, tokens=400, token_delay=0.05, **options)


async def answered_by(client: httpx.AsyncClient, gateway: str, payload: object) -> str:
    response = await client.post(f"{gateway}{CHAT}", json=payload)
    assert response.status_code == 200, response.text
    return response.headers["x-ntonix-backend"]


class HeldStream:
    """A streaming response the test keeps open and reads slowly in the background."""

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
        """The client leaves: its connection closes, so the gateway lets go of the upstream."""
        self.closed = True
        self._reading.cancel()
        await self._stopped.wait()
        await self.response.aclose()


class HeldStreams:
    """Streams opened one after the other, each kept open until the test hangs up on it."""

    def __init__(self, client: httpx.AsyncClient, gateway: str, nursery: trio.Nursery) -> None:
        self._client = client
        self._gateway = gateway
        self._nursery = nursery
        self.all: list[HeldStream] = []

    async def open(self, payload: object) -> HeldStream:
        """Send a streaming request; return once its response head has arrived."""
        request = self._client.build_request("POST", f"{self._gateway}{CHAT}", json=payload)
        response = await self._client.send(request, stream=True)
        assert response.status_code == 200
        stream = HeldStream(response)
        self.all.append(stream)
        self._nursery.start_soon(stream.read_slowly)
        return stream

    def on(self, name: str) -> list[HeldStream]:
        return [stream for stream in self.all if stream.backend == name and not stream.closed]


@asynccontextmanager
async def held_streams(client: httpx.AsyncClient, gateway: str) -> AsyncIterator[HeldStreams]:
    """Leaving the block hangs up on every stream still open."""
    async with trio.open_nursery() as nursery:
        streams = HeldStreams(client, gateway, nursery)
        try:
            yield streams
        finally:
            for stream in streams.all:
                if not stream.closed:
                    await stream.hang_up()


# --- weighted-round-robin -------------------------------------------------------------------


async def test_weighted_round_robin_splits_400_requests_3_to_1(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    heavy = await instant_mock(start_mock, "heavy")
    light = await instant_mock(start_mock, "light")
    gateway = await start_gateway_with(
        gateway_config(
            backend(heavy.url, "heavy", weight=3),
            backend(light.url, "light", weight=1),
            strategy="weighted-round-robin",
        )
    )
    answered: Counter[str] = Counter()

    async def client_loop(requests: int) -> None:
        for index in range(requests):
            answered[await answered_by(client, gateway, chat(f"q{index}", stream=False))] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(client_loop, 50)

    assert answered.total() == 400
    assert abs(answered["heavy"] - 300) <= 300 * 0.05
    assert abs(answered["light"] - 100) <= 100 * 0.05
    # The header tells the truth: the mocks counted the same split.
    assert heavy.stats["requests"] == answered["heavy"]
    assert light.stats["requests"] == answered["light"]


async def test_weighted_round_robin_interleaves_smoothly_like_nginx(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    a, b, c = [await instant_mock(start_mock, name) for name in "abc"]
    gateway = await start_gateway_with(
        gateway_config(
            backend(a.url, "a", weight=5),
            backend(b.url, "b", weight=1),
            backend(c.url, "c", weight=1),
            strategy="weighted-round-robin",
        )
    )
    order = [await answered_by(client, gateway, chat(stream=False)) for _ in range(14)]
    # Smooth: a a b a c a a, not a a a a a b c; and the cycle repeats.
    assert "".join(order) == "aabacaa" * 2


# --- least-connections ----------------------------------------------------------------------


async def test_least_connections_sends_new_requests_away_from_a_backend_busy_with_streams(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    a = await slow_mock(start_mock, "a")
    b = await slow_mock(start_mock, "b")
    gateway = await start_gateway_with(
        gateway_config(backend(a.url, "a"), backend(b.url, "b"), strategy="least-connections")
    )
    short = {"x-mock-tokens": "2"}
    async with held_streams(client, gateway) as streams:
        # Four long streams share the two idle backends evenly...
        for index in range(4):
            await streams.open(chat(f"long {index}"))
        assert Counter(stream.backend for stream in streams.all) == {"a": 2, "b": 2}
        # ...then the clients on b leave: two long streams stay pinned on a.
        for stream in streams.on("b"):
            await stream.hang_up()
        await wait_for_backend(client, gateway, "b", lambda b: b["active_requests"] == 0)
        await wait_for_backend(client, gateway, "a", lambda a: a["active_requests"] == 2)

        for index in range(6):
            response = await client.post(
                f"{gateway}{CHAT}", json=chat(f"short {index}", stream=False), headers=short
            )
            assert response.headers["x-ntonix-backend"] == "b"
        # A long stream on b too (1 vs 2): b is still the less loaded one.
        assert (await streams.open(chat("long on b"))).backend == "b"
        response = await client.post(f"{gateway}{CHAT}", json=chat(stream=False), headers=short)
        assert response.headers["x-ntonix-backend"] == "b"
        assert len(streams.on("a")) == 2
        assert not any(stream.done.is_set() for stream in streams.all)


# --- prefix-affinity ------------------------------------------------------------------------

SYSTEM_PROMPT = "You are the careful assistant of the ACME support desk. " * 6


def with_system_prompt(system: str, question: str, *, stream: bool = False) -> dict[str, Any]:
    return {
        **chat(stream=stream),
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }


async def test_prefix_affinity_sends_prompts_sharing_a_prefix_to_one_backend(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mocks = [await instant_mock(start_mock, name) for name in "abc"]
    gateway = await start_gateway_with(
        gateway_config(*(backend(m.url, n) for m, n in zip(mocks, "abc", strict=True)),
                       strategy="prefix-affinity")
    )  # fmt: skip
    assert len(SYSTEM_PROMPT) > 256  # the questions differ only after the prefix that counts
    shared = {
        await answered_by(client, gateway, with_system_prompt(SYSTEM_PROMPT, f"question {i}"))
        for i in range(12)
    }
    assert len(shared) == 1  # that backend's prefix cache serves every one of them

    # Prompts that differ within their first 256 characters spread over the backends.
    spread = Counter(
        [
            await answered_by(client, gateway, with_system_prompt(f"Tenant {i}.", "hello"))
            for i in range(30)
        ]
    )
    assert set(spread) == {"a", "b", "c"}


async def test_prefix_affinity_spills_a_hot_prefix_instead_of_overloading_its_home(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mocks = [await slow_mock(start_mock, name) for name in "abc"]
    gateway = await start_gateway_with(
        gateway_config(*(backend(m.url, n) for m, n in zip(mocks, "abc", strict=True)),
                       strategy="prefix-affinity")
    )  # fmt: skip
    hot = with_system_prompt(SYSTEM_PROMPT, "the same question", stream=True)
    count = 6
    async with held_streams(client, gateway) as streams:
        for _ in range(count):
            await streams.open(hot)
        placed = Counter(stream.backend for stream in streams.all)
    # Consistent hashing with bounded loads (factor 1.25): no node takes more than
    # ceil(1.25 * average), so the hot prefix spills to a ring neighbour.
    assert len(placed) >= 2
    assert max(placed.values()) <= math.ceil(1.25 * count / 3)


# --- model-aware routing --------------------------------------------------------------------


@attrs.frozen
class ModelCase:
    model: str
    status: int
    answered_by: frozenset[str] = frozenset()  # for a 200: every backend that may answer
    code: str | None = None  # for an error: its code


MODEL_CASES = [
    ModelCase("beta", 200, frozenset({"b"})),  # in b's config
    ModelCase("alpha", 200, frozenset({"a"})),  # learned from a's /v1/models by the probe
    ModelCase("shared", 200, frozenset({"a", "b"})),
    ModelCase("nobody-serves-this", 404, code="model_not_found"),
    ModelCase("gamma", 503, code="no_healthy_backend"),  # only c serves it, and c is down
]


async def start_model_cluster(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> tuple[str, RunningMock, RunningMock]:
    """a serves alpha and shared (learned by probes), b beta and shared (config), c gamma
    (config) but is down; returns once the gateway knows all that."""
    a = await instant_mock(start_mock, "a", models=("alpha", "shared"))
    b = await instant_mock(start_mock, "b", models=("beta", "shared"))
    gateway = await start_gateway_with(
        gateway_config(
            backend(a.url, "a"),
            backend(b.url, "b", models=("beta", "shared")),
            backend(closed_port_url(), "c", models=("gamma",)),
            health=FAST_HEALTH,
        )
    )
    await wait_for_backend(client, gateway, "a", lambda a: a["models"] == ["alpha", "shared"])
    await wait_for_backend(client, gateway, "c", lambda c: c["state"] == "open")
    return gateway, a, b


async def test_requests_go_only_to_backends_that_serve_their_model(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    gateway, a, b = await start_model_cluster(start_mock, start_gateway_with, client)
    for case in MODEL_CASES:
        answered = set()
        for index in range(6):
            payload = chat(f"q{index}", stream=False, model=case.model)
            response = await client.post(f"{gateway}{CHAT}", json=payload)
            assert response.status_code == case.status, (case, response.text)
            if case.code is not None:
                assert response.json()["error"]["code"] == case.code
            else:
                answered.add(response.headers["x-ntonix-backend"])
            if case.status == 503:
                assert int(response.headers["retry-after"]) >= 1
        assert answered == case.answered_by, case
    # Only the three servable models reached a backend, and none was refused there.
    assert a.stats["requests"] + b.stats["requests"] == 3 * 6
    assert a.stats["completed"] + b.stats["completed"] == 3 * 6


async def test_model_lists_are_the_union_over_healthy_backends(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    gateway, _, _ = await start_model_cluster(start_mock, start_gateway_with, client)
    openai = await client.get(f"{gateway}/v1/models")
    assert openai.status_code == 200
    assert openai.json()["object"] == "list"
    # gamma is missing: its only backend is down.
    assert [model["id"] for model in openai.json()["data"]] == ["alpha", "beta", "shared"]
    ollama = await client.get(f"{gateway}/api/tags")
    assert ollama.status_code == 200
    assert [model["name"] for model in ollama.json()["models"]] == ["alpha", "beta", "shared"]


# --- admission and back-pressure ------------------------------------------------------------


async def start_two_slot_backend(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, **gateway: float
) -> tuple[RunningMock, str]:
    """One backend with max_concurrent = 2."""
    mock = await slow_mock(start_mock, "only")
    url = await start_gateway_with(
        gateway_config(backend(mock.url, "only", max_concurrent=2), **gateway)
    )
    return mock, url


async def test_a_full_backend_queues_requests_and_serves_them_first_come_first_served(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock, gateway = await start_two_slot_backend(start_mock, start_gateway_with)
    finished: list[str] = []

    async def short_stream(name: str) -> None:
        response = await client.post(
            f"{gateway}{CHAT}", json=chat(name), headers={"x-mock-tokens": "3"}
        )
        assert response.status_code == 200
        assert response.content.endswith(DONE)
        finished.append(name)

    async with held_streams(client, gateway) as streams:
        for index in range(2):
            await streams.open(chat(f"long {index}"))
        async with trio.open_nursery() as waiting:
            for position, name in enumerate(["first", "second", "third"], start=1):
                waiting.start_soon(short_stream, name)
                await wait_for_queued(client, gateway, position)
            assert mock.stats["requests"] == 2  # the queued requests have not reached it
            # One long stream ends: its slot serves the queue, in arrival order.
            await streams.all[0].hang_up()
        assert finished == ["first", "second", "third"]
        assert await queued(client, gateway) == 0
        assert not streams.all[1].done.is_set()  # the other slot stayed busy all along


async def test_a_request_queued_past_queue_timeout_gets_503_with_retry_after(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock, gateway = await start_two_slot_backend(start_mock, start_gateway_with, queue_timeout=0.3)
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
    mock, gateway = await start_two_slot_backend(start_mock, start_gateway_with)
    async with held_streams(client, gateway) as streams:
        for index in range(2):
            await streams.open(chat(f"long {index}"))
        raw = await RawClient.connect(gateway)
        await raw.send_request("POST", CHAT, chat("impatient"))
        await wait_for_queued(client, gateway, 1)
        await raw.hang_up()
        await wait_for_queued(client, gateway, 0, timeout=1)
    # Both slots are free now: had the impatient request stayed queued, it would go out.
    await wait_until(lambda: mock.stats["active"] == 0)
    await trio.sleep(0.2)
    assert mock.stats["requests"] == 2
    await wait_for_backend(client, gateway, "only", lambda only: only["active_requests"] == 0)


async def test_max_concurrent_caps_every_backend_and_the_overflow_queues_then_completes(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mocks = {name: await start_mock(name, tokens=10, token_delay=0.02) for name in "ab"}
    gateway = await start_gateway_with(
        gateway_config(*(backend(mock.url, name, max_concurrent=2) for name, mock in mocks.items()))
    )
    most_active = dict.fromkeys(mocks, 0)
    most_queued = 0
    bodies: list[bytes] = []

    async def watch() -> None:
        nonlocal most_queued
        while True:
            for name, mock in mocks.items():
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
    assert all(body.endswith(DONE) and b"event: error" not in body for body in bodies)
    assert max(most_active.values()) <= 2
    assert most_queued > 0
    assert sum(mock.stats["completed"] for mock in mocks.values()) == 10


async def test_a_freed_slot_reaches_a_queued_request_that_can_use_it_behind_one_that_cannot(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    alpha = await slow_mock(start_mock, "alpha-node", models=("alpha",))
    beta = await slow_mock(start_mock, "beta-node", models=("beta",))
    gateway = await start_gateway_with(
        gateway_config(
            backend(alpha.url, "alpha-node", models=("alpha",), max_concurrent=1),
            backend(beta.url, "beta-node", models=("beta",), max_concurrent=1),
            queue_timeout=2,
        )
    )
    statuses: dict[str, int] = {}

    async def short_stream(model: str) -> None:
        response = await client.post(
            f"{gateway}{CHAT}", json=chat(model=model), headers={"x-mock-tokens": "2"}
        )
        statuses[model] = response.status_code

    async with held_streams(client, gateway) as streams:
        await streams.open(chat(model="alpha"))
        beta_stream = await streams.open(chat(model="beta"))
        async with trio.open_nursery() as waiting:
            waiting.start_soon(short_stream, "alpha")  # first in the queue, for the busy node
            await wait_for_queued(client, gateway, 1)
            waiting.start_soon(short_stream, "beta")
            await wait_for_queued(client, gateway, 2)
            await beta_stream.hang_up()  # beta-node is free: the beta request can go now
            await wait_until(lambda: "beta" in statuses, timeout=5)
            assert statuses["beta"] == 200  # not a 503 after queue_timeout on an idle node
            assert "alpha" not in statuses  # still waiting for alpha-node
            await streams.on("alpha-node")[0].hang_up()
    assert statuses == {"alpha": 200, "beta": 200}
