"""Tokens on the shared tier: a named key's token and request limits hold across instances,
and an answer one instance generated counts as cached wherever another served it (an L2 hit,
a follower of a flight on another instance)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import httpx
import trio

from ntonix.config import AuthSettings, CacheSettings, KeySettings
from ntonix.core.token_limits import DAY
from ntonix.shared_keys import token_names
from tests.conftest import StartGatewayWith, StartMock
from tests.shared_support import ValkeyServer, tier_config
from tests.support import chat, eventually

CHAT = "/v1/chat/completions"
ADMIN = {"authorization": "Bearer admin-secret"}
AS_TEAM = {"authorization": "Bearer sk-team-a"}


def team_auth(**limits: int) -> AuthSettings:
    team = KeySettings(name="team-a", key="sk-team-a", **limits)
    return AuthSettings(keys=(team,), admin_token="admin-secret")


async def tokens_in_tier(valkey: ValkeyServer) -> int:
    """What the tier holds for team-a today (the gateways charge it a moment after the end)."""
    client = hashlib.sha256(b"key:team-a").hexdigest()[:32]
    _, day = token_names(client, int(time.time() // DAY))
    async with valkey.client() as raw:
        value = await raw.get(day)
    return int(value or 0)


async def usage_of(client: httpx.AsyncClient, gateway: str) -> dict[str, int]:
    keys = (await client.get(f"{gateway}/ntonix/usage", headers=ADMIN)).json()["keys"]
    total: dict[str, int] = keys["team-a"]["total"] if "team-a" in keys else {}
    return total


async def test_a_key_s_token_and_request_limits_hold_across_two_instances(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock(tokens=100, token_delay=0.0)
    auth = team_auth(tokens_per_minute=300, requests_per_minute=100)
    config = tier_config(mock.url, valkey.url, auth=auth, cache=CacheSettings(enabled=False))
    gateways = [await start_gateway_with(config), await start_gateway_with(config)]
    seen: list[httpx.Response] = []
    charged = 0
    for n in range(3):
        body = chat(f"question {n}", stream=False)
        answer = await client.post(f"{gateways[n % 2]}{CHAT}", json=body, headers=AS_TEAM)
        assert answer.status_code == 200
        seen.append(answer)
        usage: dict[str, Any] = answer.json()["usage"]
        charged += usage["prompt_tokens"] + usage["completion_tokens"]

        async def landed(expected: int = charged) -> bool:
            return await tokens_in_tier(valkey) == expected

        await eventually(landed)

    remaining = [int(answer.headers["x-ratelimit-remaining-tokens"]) for answer in seen]
    cost = remaining[0] - remaining[1]  # prompt + 100 completion tokens, charged on the other
    assert remaining[0] == 300 and cost > 100 and remaining[2] == 300 - 2 * cost
    requests = [int(answer.headers["x-ratelimit-remaining-requests"]) for answer in seen]
    assert requests == [99, 98, 97]

    refused = await client.post(
        f"{gateways[1]}{CHAT}", json=chat("one too many", stream=False), headers=AS_TEAM
    )
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 50 <= int(refused.headers["retry-after"]) <= 61
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.headers["x-ratelimit-remaining-requests"] == "97"  # a refusal takes none
    assert mock.stats["requests"] == 3


async def test_an_l2_hit_counts_the_answer_s_tokens_as_cached(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock(tokens=100, token_delay=0.0)
    config = tier_config(mock.url, valkey.url, auth=team_auth())
    a, b = await start_gateway_with(config), await start_gateway_with(config)
    body = chat("stored once, served twice", stream=False)

    first = await client.post(f"{a}{CHAT}", json=body, headers=AS_TEAM)
    await eventually(lambda: _stored(client, a))
    second = await client.post(f"{b}{CHAT}", json=body, headers=AS_TEAM)

    assert second.headers["x-ntonix-cache"] == "hit" and second.content == first.content
    usage = first.json()["usage"]
    generated, served = await usage_of(client, a), await usage_of(client, b)
    assert generated["completion"] == 100 and generated["cached"] == 0
    assert served["completion"] == served["prompt"] == 0
    assert served["cached"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_a_follower_of_another_instance_s_flight_counts_its_tokens_as_cached(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock(ttft=0.3, tokens=20, token_delay=0.01)
    config = tier_config(mock.url, valkey.url, auth=team_auth())
    gateways = [await start_gateway_with(config), await start_gateway_with(config)]
    answers: list[httpx.Response] = []

    async def ask(gateway: str) -> None:
        body = chat("one for both")
        answers.append(await client.post(f"{gateway}{CHAT}", json=body, headers=AS_TEAM))

    async with trio.open_nursery() as nursery:
        for gateway in gateways:
            nursery.start_soon(ask, gateway)

    assert mock.stats["requests"] == 1
    assert sorted(answer.headers["x-ntonix-cache"] for answer in answers) == ["coalesced", "miss"]
    totals = [await usage_of(client, gateway) for gateway in gateways]
    generated = sum(total["prompt"] + total["completion"] for total in totals)
    assert sum(total["completion"] for total in totals) == 20  # generated once
    assert sum(total["cached"] for total in totals) == generated  # and served once more
    assert sum(total["estimated"] for total in totals) == 0


async def _stored(client: httpx.AsyncClient, gateway: str) -> bool:
    answer = await client.get(f"{gateway}/ntonix/status", headers=ADMIN)
    return bool(answer.json()["cache"]["l2_stored"] >= 1)


async def test_with_the_tier_gone_each_worker_holds_the_token_limit_on_its_own(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    valkey: ValkeyServer,
) -> None:
    mock = await start_mock(tokens=100, token_delay=0.0)
    auth = team_auth(tokens_per_minute=300)
    config = tier_config(mock.url, valkey.url, auth=auth, cache=CacheSettings(enabled=False))
    gateway = await start_gateway_with(config)
    await valkey.kill()

    codes = []
    for n in range(4):
        body = chat(f"question {n}", stream=False)
        answer = await client.post(f"{gateway}{CHAT}", json=body, headers=AS_TEAM)
        codes.append(answer.status_code)

    assert codes == [200, 200, 200, 429]
    assert mock.stats["requests"] == 3
