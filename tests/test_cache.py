"""The response cache end to end (SPEC sections 2 and 4): hits replayed as the same stream,
identical requests in flight sharing one upstream request, what is never stored, the key, the
bounds and the controls. Real sockets, an in-process mock and gateway per test."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import pytest
import trio

from ntonix.config import BackendSettings, CacheSettings, Config
from tests.conftest import RunningMock, StartGatewayWith, StartMock
from tests.support import QUIET_HEALTH, RawClient, chat, sse_events, status, wait_until

CHAT = "/v1/chat/completions"
# The contract is 100 ms; tests allow more on a loaded machine (as test_cancellation does).
GENEROUS_CLOSE_BOUND = 0.5
# cache.MAX_LAG_BYTES, as docs/architecture.md documents it: how far the slowest listener of a
# shared stream may fall behind before the upstream is no longer read.
DOCUMENTED_LAG = 1024 * 1024


def cache_config(*mocks: RunningMock, **cache: Any) -> Config:
    """One backend per mock, probes out of the way, the cache as given (enabled by default)."""
    backends = tuple(BackendSettings(name=f"backend-{i}", url=m.url) for i, m in enumerate(mocks))
    return Config(backends=backends, health=QUIET_HEALTH, cache=CacheSettings(**cache))


async def post(
    client: httpx.AsyncClient,
    gateway: str,
    payload: object,
    *,
    path: str = CHAT,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    response = await client.post(f"{gateway}{path}", json=payload, headers=headers)
    await response.aread()
    return response


async def direct(client: httpx.AsyncClient, mock: RunningMock, payload: object) -> bytes:
    """What the backend itself answers (at full speed: an OpenAI answer's bytes do not depend on
    the token timing)."""
    response = await post(client, mock.url, payload, headers={"x-mock-token-delay": "0"})
    assert response.status_code == 200
    return response.content


def label(response: httpx.Response) -> str:
    value: str = response.headers.get("x-ntonix-cache", "")
    return value


async def cache_stats(client: httpx.AsyncClient, gateway: str) -> dict[str, Any]:
    stats: dict[str, Any] = (await status(client, gateway))["cache"]
    return stats


async def gather(*thunks: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run the thunks concurrently; their results in order."""
    results: list[Any] = [None] * len(thunks)

    async def run(index: int) -> None:
        results[index] = await thunks[index]()

    async with trio.open_nursery() as nursery:
        for index in range(len(thunks)):
            nursery.start_soon(run, index)
    return results


@attrs.frozen
class RawResponse:
    """A response read off the wire: its head, and its body as the HTTP chunks it came in."""

    status: int
    headers: dict[str, str]
    chunks: tuple[bytes, ...]  # one element for a Content-Length body

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def parse_raw(data: bytes) -> RawResponse:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return RawResponse(int(lines[0].split()[1]), headers, (rest,))
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n", "malformed chunked body"
        rest = rest[size + 2 :]
    return RawResponse(int(lines[0].split()[1]), headers, tuple(chunks))


async def raw_post(
    base_url: str, payload: object, *, path: str = CHAT, headers: dict[str, str] | None = None
) -> RawResponse:
    """POST on a fresh connection that the server closes after answering; read to the end."""
    raw = await RawClient.connect(base_url)
    try:
        await raw.send_request(
            "POST", path, payload, headers={"connection": "close", **(headers or {})}
        )
        with trio.fail_after(10):
            while data := await raw.stream.receive_some(65536):
                raw.received += data
    finally:
        raw.stream.socket.close()
    return parse_raw(raw.received)


def events_of(body: bytes) -> list[bytes]:
    """SSE events, each with the blank line that ends it, as a hit must replay them."""
    return [event + b"\n\n" for event in sse_events(body)]


# --- hits --------------------------------------------------------------------------------------


async def test_same_request_twice_is_a_hit_and_the_backend_is_not_asked_again(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat("twice", stream=False)
    first = await post(client, gateway, payload, headers={"x-request-id": "first"})
    assert first.status_code == 200
    assert label(first) == "miss"
    assert mock.stats["requests"] == 1
    second = await post(client, gateway, payload, headers={"x-request-id": "second"})
    assert second.status_code == 200
    assert label(second) == "hit"
    assert mock.stats["requests"] == 1
    assert second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"]
    assert second.json()["choices"][0]["message"]["content"]
    # Per-request headers belong to the request being answered, never to the one cached.
    assert second.headers["x-request-id"] == "second"
    # And what the cache answered is what the backend answers.
    direct = await post(client, mock.url, payload)
    assert direct.content == first.content


async def test_streamed_hit_replays_the_same_events_as_a_stream(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock(tokens=12)
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat("stream me", stream_options={"include_usage": True})
    miss = await raw_post(gateway, payload)
    assert miss.status == 200
    assert miss.headers["x-ntonix-cache"] == "miss"
    events = events_of(miss.body)
    assert events[-1] == b"data: [DONE]\n\n"
    assert len(events) == 12 + 4  # role, 12 tokens, finish, usage ([DONE] is the 17th)
    hit = await raw_post(gateway, payload)
    assert mock.stats["requests"] == 1
    assert hit.status == 200
    assert hit.headers["x-ntonix-cache"] == "hit"
    # A stream: chunked, one HTTP chunk per SSE event, in the same order, the same bytes.
    assert hit.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in hit.headers
    assert list(hit.chunks) == events
    assert hit.headers["content-type"] == miss.headers["content-type"]
    assert hit.headers["content-type"].startswith("text/event-stream")
    assert hit.headers["x-accel-buffering"] == "no"
    assert hit.headers["x-request-id"] != miss.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "stream"), [("/api/chat", True), ("/api/generate", True), ("/api/chat", False)]
)
async def test_ollama_hit_replays_the_same_lines(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, path: str, stream: bool
) -> None:
    mock = await start_mock(tokens=6)
    gateway = await start_gateway_with(cache_config(mock))
    payload: dict[str, Any] = {"model": "mock-llm", "stream": stream, "options": {"seed": 42}}
    if path == "/api/chat":
        payload["messages"] = [{"role": "user", "content": "ollama"}]
    else:
        payload["prompt"] = "ollama"
    miss = await raw_post(gateway, payload, path=path)
    hit = await raw_post(gateway, payload, path=path)
    assert (miss.headers["x-ntonix-cache"], hit.headers["x-ntonix-cache"]) == ("miss", "hit")
    assert mock.stats["requests"] == 1
    assert hit.body == miss.body
    assert hit.headers["content-type"] == miss.headers["content-type"]
    lines = miss.body.splitlines(keepends=True)
    assert json.loads(lines[-1])["done"] is True
    if stream:
        assert hit.headers["content-type"] == "application/x-ndjson"
        assert len(lines) == 6 + 1
        assert list(hit.chunks) == lines  # one chunk per NDJSON line
        assert "x-accel-buffering" not in hit.headers  # SSE only
    else:
        assert len(lines) == 1


# --- coalescing --------------------------------------------------------------------------------


async def test_twenty_concurrent_identical_streams_share_one_upstream_request(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=20, token_delay=0.05)  # about 1 s of stream
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat("twenty at once")

    def one(index: int) -> Callable[[], Awaitable[httpx.Response]]:
        return lambda: post(client, gateway, payload, headers={"x-request-id": f"c{index}"})

    responses: list[httpx.Response] = await gather(*(one(i) for i in range(20)))
    assert mock.stats["requests"] == 1
    assert sorted(label(r) for r in responses) == ["coalesced"] * 19 + ["miss"]
    expected = await direct(client, mock, payload)  # what the backend produces
    for index, response in enumerate(responses):
        assert response.status_code == 200
        assert response.content == expected
        assert response.headers["x-request-id"] == f"c{index}"
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
    stats = await cache_stats(client, gateway)
    assert (stats["misses"], stats["coalesced"], stats["hits"]) == (1, 19, 0)
    # The shared stream ended normally: it was stored once.
    assert stats["entries"] == 1
    assert label(await post(client, gateway, payload)) == "hit"


async def _join_raw(gateway: str, payload: object, name: str) -> RawClient:
    raw = await RawClient.connect(gateway)
    await raw.send_request("POST", CHAT, payload, headers={"x-request-id": name})
    await raw.read_until(b'"content"')
    return raw


async def test_first_client_leaving_does_not_cut_the_followers(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=40, token_delay=0.05)  # about 2 s of stream
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat("the first one leaves")
    first = await _join_raw(gateway, payload, "first")
    assert b"x-ntonix-cache: miss" in first.received
    responses: list[httpx.Response | None] = [None] * 19

    async def follow(index: int) -> None:
        responses[index] = await post(client, gateway, payload)

    async with trio.open_nursery() as nursery:
        for index in range(19):
            nursery.start_soon(follow, index)
        # Every follower has joined the flight; then the client that started it leaves.
        with trio.fail_after(5):
            while (await cache_stats(client, gateway))["coalesced"] < 19:
                await trio.sleep(0.01)
        assert all(response is None for response in responses)  # mid-stream, all of them
        await first.hang_up()
    assert mock.stats["requests"] == 1
    assert mock.stats["client_disconnects"] == 0
    assert mock.stats["completed"] == 1
    expected = await direct(client, mock, payload)
    assert expected.endswith(b"data: [DONE]\n\n")
    for response in responses:
        assert response is not None
        assert response.status_code == 200
        assert label(response) == "coalesced"
        assert response.content == expected
    assert label(await post(client, gateway, payload)) == "hit"


@pytest.mark.parametrize("listeners", [1, 3])
async def test_when_every_listener_leaves_the_upstream_closes_and_nothing_is_stored(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    listeners: int,
) -> None:
    mock = await start_mock(tokens=200, token_delay=0.02)
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat(f"everyone leaves ({listeners})")
    raws = [await _join_raw(gateway, payload, f"l{i}") for i in range(listeners)]
    assert (await cache_stats(client, gateway))["coalesced"] == listeners - 1
    # All but the last leave: the upstream keeps going for the one still listening.
    for raw in raws[:-1]:
        await raw.hang_up()
    await trio.sleep(0.2)
    assert mock.stats["active"] == 1
    assert mock.stats["client_disconnects"] == 0
    last = raws[-1]
    before = len(last.received)
    with trio.fail_after(2):  # it still gets tokens
        while len(last.received) < before + 500:
            last.received += await last.stream.receive_some(65536)
    hung_up_at = await raws[-1].hang_up()
    await wait_until(lambda: mock.stats["client_disconnects"] == 1, timeout=2)
    assert mock.stats["disconnects"][-1]["at"] - hung_up_at < GENEROUS_CLOSE_BOUND
    await wait_until(lambda: mock.stats["active"] == 0, timeout=2)
    assert mock.stats["requests"] == 1
    assert mock.stats["completed"] == 0
    stats = await cache_stats(client, gateway)
    assert (stats["entries"], stats["flights"]) == (0, 0)
    # Nothing was stored: the same request asks the backend again.
    again = await post(client, gateway, payload, headers={"x-mock-tokens": "5"})
    assert label(again) == "miss"
    assert mock.stats["requests"] == 2


# --- what is never stored ----------------------------------------------------------------------


async def test_stream_broken_mid_way_is_not_stored(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=10, token_delay=0.03)
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat("broken")
    drop = {"x-mock-drop-after": "4"}
    # Two clients share the broken stream: both are told, neither gets a clean end.
    broken: list[RawResponse] = await gather(
        lambda: raw_post(gateway, payload, headers=drop),
        lambda: raw_post(gateway, payload, headers=drop),
    )
    assert sorted(r.headers["x-ntonix-cache"] for r in broken) == ["coalesced", "miss"]
    for response in broken:
        assert response.status == 200
        assert b"event: error" in response.body
        assert b"[DONE]" not in response.body
    assert broken[0].body == broken[1].body
    assert (mock.stats["requests"], mock.stats["dropped"]) == (1, 1)
    assert (await cache_stats(client, gateway))["entries"] == 0
    whole = await post(client, gateway, payload)
    assert label(whole) == "miss"
    assert mock.stats["requests"] == 2
    assert whole.content.endswith(b"data: [DONE]\n\n")
    hit = await post(client, gateway, payload)
    assert label(hit) == "hit"
    assert hit.content == whole.content


async def test_body_broken_mid_way_is_not_stored(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    """A non-streaming answer cut by the backend has no frame to carry an error: the client's
    response is aborted (never a short body that looks complete), and nothing is stored."""
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat("cut short", stream=False)
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, gateway, payload, headers={"x-mock-drop-after": "0"})
    assert mock.stats["dropped"] == 1
    assert (await cache_stats(client, gateway))["entries"] == 0
    whole = await post(client, gateway, payload)
    assert (whole.status_code, label(whole)) == (200, "miss")
    assert whole.json()["choices"][0]["message"]["content"]
    assert mock.stats["requests"] == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("code", ["500", "400"])
async def test_error_status_is_not_stored(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    code: str,
    stream: bool,
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat(f"fails with {code}", stream=stream)
    failed = await post(client, gateway, payload, headers={"x-mock-status": code})
    assert failed.status_code == int(code)
    assert label(failed) == "miss"
    assert (await cache_stats(client, gateway))["entries"] == 0
    ok = await post(client, gateway, payload)
    assert ok.status_code == 200
    assert label(ok) == "miss"
    assert mock.stats["requests"] == 2


# --- the key -----------------------------------------------------------------------------------


async def test_requests_that_differ_in_what_they_ask_never_share_an_entry(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(models=("mock-llm", "other-llm"))
    gateway = await start_gateway_with(cache_config(mock))
    base = chat("which entry?", stream=False)
    variants = [
        base,
        {**base, "temperature": 0.2, "seed": 7},
        {**base, "temperature": 0.7, "seed": 7},
        {**base, "model": "other-llm"},
        {**base, "stream": True},
        {**base, "max_tokens": 3},
    ]
    first = [await post(client, gateway, variant) for variant in variants]
    assert [label(r) for r in first] == ["miss"] * len(variants)
    assert mock.stats["requests"] == len(variants)
    assert len({r.content for r in first}) == len(variants)  # six different answers
    again = [await post(client, gateway, variant) for variant in variants]
    assert [label(r) for r in again] == ["hit"] * len(variants)
    assert [r.content for r in again] == [r.content for r in first]
    assert mock.stats["requests"] == len(variants)
    # Nor do two routes share an entry for the same body.
    other_route = await post(client, gateway, base, path="/v1/completions")
    assert label(other_route) == "miss"
    assert other_route.json()["object"] == "text_completion"
    assert mock.stats["requests"] == len(variants) + 1
    # Key order and whitespace are not part of the question.
    reordered = json.dumps(dict(reversed(list(base.items()))), indent=2).encode()
    same = await client.post(
        f"{gateway}{CHAT}", content=reordered, headers={"content-type": "application/json"}
    )
    assert label(same) == "hit"
    assert same.content == first[0].content


async def test_scope_key_gives_each_api_key_its_own_cache(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock, scope="key"))
    payload = chat("whose answer?", stream=False)
    a = {"authorization": "Bearer key-A"}
    b = {"authorization": "Bearer key-B"}
    assert label(await post(client, gateway, payload, headers=a)) == "miss"
    assert label(await post(client, gateway, payload, headers=b)) == "miss"
    assert label(await post(client, gateway, payload)) == "miss"  # no key: its own scope too
    assert mock.stats["requests"] == 3
    assert label(await post(client, gateway, payload, headers=a)) == "hit"
    assert label(await post(client, gateway, payload, headers=b)) == "hit"
    assert mock.stats["requests"] == 3


async def test_scope_global_shares_between_api_keys(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock, scope="global"))
    payload = chat("everyone's answer", stream=False)
    first = await post(client, gateway, payload, headers={"authorization": "Bearer key-A"})
    second = await post(client, gateway, payload, headers={"authorization": "Bearer key-B"})
    third = await post(client, gateway, payload)
    assert [label(r) for r in (first, second, third)] == ["miss", "hit", "hit"]
    assert first.content == second.content == third.content
    assert mock.stats["requests"] == 1


# --- sampled requests --------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [{"temperature": 0.7}, {}], ids=["t0.7", "no-temperature"])
async def test_sampled_requests_bypass_the_cache_and_are_never_coalesced(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    sampling: dict[str, Any],
) -> None:
    mock = await start_mock(tokens=20, token_delay=0.02)
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat("tell me something new")
    del payload["temperature"]
    payload.update(sampling)
    one, two = await gather(
        lambda: post(client, gateway, payload), lambda: post(client, gateway, payload)
    )
    # Two concurrent identical sampled requests: two samples from the backend.
    assert mock.stats["requests"] == 2
    assert (label(one), label(two)) == ("bypass", "bypass")
    assert one.content != two.content
    three = await post(client, gateway, payload)
    assert label(three) == "bypass"
    assert mock.stats["requests"] == 3
    stats = await cache_stats(client, gateway)
    assert (stats["bypass"], stats["entries"], stats["misses"], stats["coalesced"]) == (3, 0, 0, 0)


async def test_sampled_requests_are_cached_when_deterministic_only_is_off(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=20, token_delay=0.02)
    gateway = await start_gateway_with(cache_config(mock, deterministic_only=False))
    payload = chat("cache even samples", temperature=0.7)
    one, two = await gather(
        lambda: post(client, gateway, payload), lambda: post(client, gateway, payload)
    )
    assert sorted([label(one), label(two)]) == ["coalesced", "miss"]
    assert one.content == two.content
    three = await post(client, gateway, payload)
    assert label(three) == "hit"
    assert three.content == one.content
    assert mock.stats["requests"] == 1


# --- bounds ------------------------------------------------------------------------------------


async def test_eviction_by_entries_drops_the_least_recently_used(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock, max_entries=2))

    async def ask(name: str) -> str:
        return label(await post(client, gateway, chat(name, stream=False)))

    seen = [await ask(name) for name in ("A", "B", "C", "C", "B", "A", "B", "C")]
    # A is evicted by C; then B is used, so A evicts C; then B is used, so C evicts A.
    assert seen == ["miss", "miss", "miss", "hit", "hit", "miss", "hit", "miss"]
    assert mock.stats["requests"] == 5
    stats = await cache_stats(client, gateway)
    assert (stats["entries"], stats["evictions"]) == (2, 3)


async def test_eviction_by_bytes(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=30)
    # Measure one entry on a roomy cache first.
    roomy = await start_gateway_with(cache_config(mock))
    await post(client, roomy, chat("bytes-A"))
    size = (await cache_stats(client, roomy))["bytes"]
    assert size > 30 * 50  # thirty SSE events of well over 50 bytes each
    # Room for one entry, not two: each newcomer evicts the other.
    gateway = await start_gateway_with(cache_config(mock, max_bytes=size * 3 // 2))
    seen = [
        label(await post(client, gateway, chat(name))) for name in ("bytes-A", "bytes-B", "bytes-A")
    ]
    assert seen == ["miss", "miss", "miss"]
    stats = await cache_stats(client, gateway)
    assert (stats["entries"], stats["evictions"]) == (1, 2)
    assert size * 2 // 3 < stats["bytes"] <= size * 3 // 2
    assert label(await post(client, gateway, chat("bytes-A"))) == "hit"
    # An answer larger than the whole cache is never stored (and evicts nothing).
    tiny = await start_gateway_with(cache_config(mock, max_bytes=size // 2))
    seen = [label(await post(client, tiny, chat("bytes-A"))) for _ in range(2)]
    assert seen == ["miss", "miss"]
    assert (await cache_stats(client, tiny))["entries"] == 0


async def test_entries_expire_after_the_ttl(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock, ttl=1.0))
    payload = chat("short-lived", stream=False)
    assert label(await post(client, gateway, payload)) == "miss"
    assert label(await post(client, gateway, payload)) == "hit"
    await trio.sleep(1.2)
    assert label(await post(client, gateway, payload)) == "miss"
    assert mock.stats["requests"] == 2
    stats = await cache_stats(client, gateway)
    assert stats["expirations"] == 1
    assert stats["entries"] == 1  # the fresh answer was stored again


# --- controls ----------------------------------------------------------------------------------


async def test_no_cache_skips_the_lookup(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat("fresh please", stream=False)
    assert label(await post(client, gateway, payload)) == "miss"
    fresh = await post(client, gateway, payload, headers={"cache-control": "no-cache"})
    assert label(fresh) == "miss"
    assert mock.stats["requests"] == 2  # a fresh upstream request despite the entry
    # no-cache does not forbid storing: the fresh answer is the entry now.
    assert label(await post(client, gateway, payload)) == "hit"
    assert mock.stats["requests"] == 2


async def test_no_store_skips_storing(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat("do not keep this", stream=False)
    no_store = {"cache-control": "no-store"}
    assert label(await post(client, gateway, payload, headers=no_store)) == "miss"
    assert (await cache_stats(client, gateway))["entries"] == 0
    assert label(await post(client, gateway, payload)) == "miss"
    assert mock.stats["requests"] == 2
    # no-store does not forbid the lookup: an entry stored meanwhile answers it.
    assert label(await post(client, gateway, payload, headers=no_store)) == "hit"
    both = {"cache-control": "no-cache, no-store"}
    # Neither looked up nor stored: the cache is not involved at all.
    assert (
        label(await post(client, gateway, chat("neither", stream=False), headers=both)) == "bypass"
    )
    assert (await cache_stats(client, gateway))["entries"] == 1
    assert mock.stats["requests"] == 3


async def test_delete_clears_the_cache(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(cache_config(mock))
    for name in ("one", "two"):
        await post(client, gateway, chat(name, stream=False))
    assert (await cache_stats(client, gateway))["entries"] == 2
    cleared = await client.delete(f"{gateway}/ntonix/cache")
    assert cleared.status_code == 200
    assert cleared.json() == {"cleared": 2}
    stats = await cache_stats(client, gateway)
    assert (stats["entries"], stats["bytes"]) == (0, 0)
    assert label(await post(client, gateway, chat("one", stream=False))) == "miss"
    assert mock.stats["requests"] == 3


async def test_status_counts_what_happened(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=20, token_delay=0.02)
    gateway = await start_gateway_with(cache_config(mock))
    a, b, c = chat("A", stream=False), chat("B"), chat("C")
    bodies = [
        (await post(client, gateway, a)).content,  # miss
        (await post(client, gateway, a)).content,  # hit
        (await post(client, gateway, a)).content,  # hit
        (await post(client, gateway, b)).content,  # miss
        (await post(client, gateway, b)).content,  # hit
    ]
    await post(client, gateway, chat("sampled", temperature=0.5))  # bypass
    concurrent = await gather(*(lambda: post(client, gateway, c) for _ in range(3)))
    assert sorted(label(r) for r in concurrent) == ["coalesced", "coalesced", "miss"]
    stats = await cache_stats(client, gateway)
    assert stats["hits"] == 3
    assert stats["misses"] == 3
    assert stats["coalesced"] == 2
    assert stats["bypass"] == 1
    assert stats["entries"] == stats["stored"] == 3
    assert stats["flights"] == 0
    # Bytes: the three answers' bodies plus their headers (a few hundred bytes each at most).
    body_bytes = len(bodies[0]) + len(bodies[3]) + len(concurrent[0].content)
    assert body_bytes < stats["bytes"] < body_bytes + 3 * 1024
    assert mock.stats["requests"] == 4


# --- a slow listener ---------------------------------------------------------------------------


async def _small_window_client(base_url: str) -> RawClient:
    """A client whose socket takes little before the sender has to wait: it stalls for real."""
    url = httpx.URL(base_url)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((url.host, url.port))
    return RawClient(trio.SocketStream(sock))


async def _read_all(raw: RawClient, done: trio.Event) -> None:
    while data := await raw.stream.receive_some(65536):
        raw.received += data
        if raw.received.endswith(b"0\r\n\r\n"):
            break
    done.set()


async def _plateau(raw: RawClient, done: trio.Event, quiet: float = 0.3) -> int:
    """How much the client had received once nothing more came for `quiet` seconds, after the
    first bytes (which, as from vLLM, come with the first token)."""
    with trio.fail_after(10):
        while not raw.received and not done.is_set():
            await trio.sleep(0.01)
        while not done.is_set():
            seen = len(raw.received)
            await trio.sleep(quiet)
            if len(raw.received) == seen:
                return seen
    return len(raw.received)


@pytest.mark.parametrize("tokens", [100, 800], ids=["within-lag", "beyond-lag"])
async def test_stalled_listener_holds_a_fast_one_back_only_beyond_the_lag(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    tokens: int,
) -> None:
    """Two listeners of one flight; one stops reading. Within the documented 1 MiB lag the fast
    one is not held back at all; beyond it the flight stops reading upstream (back-pressure),
    rather than buffering the answer for the stalled one, until the stalled one reads again."""
    # A long model name makes every SSE event about 4 KiB: megabytes in a few hundred events.
    model = "m" * 4000
    mock = await start_mock(tokens=tokens, token_delay=0, ttft=0.5, models=(model,))
    gateway = await start_gateway_with(cache_config(mock))
    payload = chat(f"a long answer of {tokens} tokens", model=model)
    expected = (await raw_post(mock.url, payload)).body
    stalled = await _small_window_client(gateway)
    await stalled.send_request("POST", CHAT, payload)
    await wait_until(lambda: mock.stats["active"] == 1)
    fast = await RawClient.connect(gateway)
    await fast.send_request("POST", CHAT, payload)
    async with trio.open_nursery() as nursery:
        done = trio.Event()
        nursery.start_soon(_read_all, fast, done)
        reached = await _plateau(fast, done)
        if len(expected) < DOCUMENTED_LAG:
            assert done.is_set(), f"held back at {reached} of {len(expected)} bytes"
        else:
            assert not done.is_set()
            # At least the lag ahead of the stalled one, which has read nothing beyond the
            # socket buffers; and not the whole answer buffered for it.
            assert DOCUMENTED_LAG < reached < len(expected) - DOCUMENTED_LAG, reached
            assert mock.stats["active"] == 1
        stalled_done = trio.Event()
        nursery.start_soon(_read_all, stalled, stalled_done)
        with trio.fail_after(20):
            await done.wait()
            await stalled_done.wait()
    for raw in (fast, stalled):
        response = parse_raw(raw.received)
        assert response.body == expected
        raw.stream.socket.close()
    assert mock.stats["requests"] == 2  # the direct fetch, and one for both listeners
    assert (await cache_stats(client, gateway))["coalesced"] == 1


# --- the gap between a flight's end and the writer storing its answer --------------------------


async def test_identical_requests_arriving_as_the_first_ends_still_ask_the_backend_once(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    """Waves of identical requests whose arrivals straddle the end of the first one's
    upstream exchange: each is either coalesced or a hit, so one upstream request per key.

    Regression: a finished flight used to leave the table of flights before the writer task
    had stored its answer, and a lookup in between found neither (a second upstream request
    in most waves)."""
    mock = await start_mock(tokens=4, token_delay=0, ttft=0)
    gateway = await start_gateway_with(cache_config(mock))
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        for wave in range(8):
            payload = chat(f"wave {wave}", stream=False)
            before = mock.stats["requests"]

            async def three_in_a_row(payload: dict[str, Any] = payload) -> list[str]:
                return [label(await post(client, gateway, payload)) for _ in range(3)]

            labels = await gather(*(three_in_a_row for _ in range(32)))
            upstream = mock.stats["requests"] - before
            misses = sum(wave_labels.count("miss") for wave_labels in labels)
            assert (upstream, misses) == (1, 1), f"wave {wave}"
