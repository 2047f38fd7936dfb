"""Fair queuing at a full backend: a key's backlog does not hold up another key, interactive
goes before batch, and the order is first come, first served within one key."""

from __future__ import annotations

import httpx
import pytest
import trio

from ntonix.config import AuthSettings, CacheSettings, Config, GatewaySettings, KeySettings
from tests.conftest import StartGatewayWith, StartMock
from tests.support import backend, chat, wait_for_queued

KEYS = (
    KeySettings(name="bulk", key="sk-bulk"),
    KeySettings(name="chat", key="sk-chat"),
    KeySettings(name="nightly", key="sk-nightly", priority="batch", weight=4),
)


def one_slot(url: str) -> Config:
    return Config(
        backends=(backend(url, "a", max_concurrent=1),),
        gateway=GatewaySettings(queue_timeout=30.0),
        auth=AuthSettings(keys=KEYS),
        cache=CacheSettings(enabled=False),
    )


async def run_in_order(
    client: httpx.AsyncClient, gateway: str, waves: list[tuple[str, int]]
) -> list[str]:
    """Send each wave's requests (key, count) once the earlier ones are queued; return the
    keys in the order their answers completed."""
    done: list[str] = []

    async def one(key: str) -> None:
        headers = {"authorization": f"Bearer sk-{key}"}
        response = await client.post(
            f"{gateway}/v1/chat/completions", json=chat(stream=False), headers=headers
        )
        assert response.status_code == 200
        done.append(key)

    sent = 0
    async with trio.open_nursery() as nursery:
        for key, count in waves:
            for _ in range(count):
                nursery.start_soon(one, key)
            sent += count
            # One in flight, the rest queued: then the next wave arrives behind them.
            await wait_for_queued(client, gateway, sent - 1)
    return done


@pytest.mark.parametrize(
    ("waves", "expected"),
    [
        # A key with a backlog: another key's request is next, not last.
        ([("bulk", 6), ("chat", 1)], ["bulk", "chat", "bulk", "bulk", "bulk", "bulk", "bulk"]),
        # Interactive before batch, whatever the batch key's weight.
        (
            [("nightly", 4), ("chat", 2)],
            ["nightly", "chat", "chat", "nightly", "nightly", "nightly"],
        ),
    ],
)
async def test_a_freed_slot_goes_to_the_fair_next(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    waves: list[tuple[str, int]],
    expected: list[str],
) -> None:
    mock = await start_mock(tokens=4, token_delay=0.03)
    gateway = await start_gateway_with(one_slot(mock.url))
    assert await run_in_order(client, gateway, waves) == expected
