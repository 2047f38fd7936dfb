"""Token limits and where usage shows, with the OpenAI SDK: x-ratelimit-* headers, 429 with
Retry-After until the window frees, /ntonix/usage and ntonix_tokens_total."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest
import trio
import trio.testing

from ntonix.config import AuthSettings, CacheSettings, Config, KeySettings, LogSettings
from tests.conftest import StartGatewayWith, StartMock
from tests.support import backend, chat

LIMITED = KeySettings(
    name="team-a", key="sk-team-a", tokens_per_minute=300, requests_per_minute=100
)
FREE = KeySettings(name="team-b", key="sk-team-b")
ADMIN = {"authorization": "Bearer admin-secret"}


def limits_config(url: str, *, cache: bool = False) -> Config:
    return Config(
        backends=(backend(url, "a"),),
        auth=AuthSettings(keys=(LIMITED, FREE), admin_token="admin-secret"),
        cache=CacheSettings(enabled=cache),
        log=LogSettings(access_log="off"),
    )


async def ask(sdk: openai.AsyncOpenAI, content: str = "hi") -> httpx.Headers:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="mock-llm", messages=[{"role": "user", "content": content}]
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 100
    return raw.headers


async def test_the_fourth_100_token_answer_in_a_minute_of_300_is_429_until_the_window_frees(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.rate = 1.0  # real time, plus the jumps this test makes
    mock = await start_mock(tokens=100, token_delay=0.0)
    gateway = await start_gateway_with(limits_config(mock.url))
    sdk = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="sk-team-a", max_retries=0)
    seen = [await ask(sdk, f"question {n}") for n in range(3)]
    remaining = [int(h["x-ratelimit-remaining-tokens"]) for h in seen]
    cost = remaining[0] - remaining[1]  # prompt + 100 completion tokens
    assert remaining[0] == 300 and cost > 100 and remaining[2] == 300 - 2 * cost
    assert [h["x-ratelimit-limit-tokens"] for h in seen] == ["300"] * 3
    assert [int(h["x-ratelimit-remaining-requests"]) for h in seen] == [99, 98, 97]
    assert all(h["x-ratelimit-limit-requests"] == "100" for h in seen)

    with pytest.raises(openai.RateLimitError) as refused:
        await ask(sdk, "one too many")
    response = refused.value.response
    assert refused.value.code == "rate_limit_exceeded"
    retry_after = int(response.headers["retry-after"])
    assert 50 <= retry_after <= 60  # the first charge leaves the window a minute after it
    assert response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert mock.stats["requests"] == 3
    # On /api the same refusal comes in Ollama's shape, as the Ollama client expects it.
    ollama_client = ollama.AsyncClient(host=gateway, headers={"authorization": "Bearer sk-team-a"})
    with pytest.raises(ollama.ResponseError) as ollama_refused:
        await ollama_client.chat(model="mock-llm", messages=[{"role": "user", "content": "x"}])
    assert ollama_refused.value.status_code == 429
    assert ollama_refused.value.error.endswith("more than 300 tokens per minute")

    # Another key is not held back by this one.
    other = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="sk-team-b", max_retries=0)
    free = await ask(other, "another tenant")
    assert "x-ratelimit-limit-tokens" not in free  # an unlimited key gets no such headers

    mock_clock.jump(retry_after)
    assert int((await ask(sdk, "after the window"))["x-ratelimit-remaining-tokens"]) > 0


async def test_usage_shows_per_key_and_model_in_the_usage_route_and_the_metrics(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=100, token_delay=0.0)
    gateway = await start_gateway_with(limits_config(mock.url, cache=True))
    for key in ("sk-team-a", "sk-team-b"):
        sdk = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)
        await ask(sdk, "same question")
    body = chat("cached", stream=False)
    headers = {"authorization": "Bearer sk-team-b"}
    await client.post(f"{gateway}/v1/chat/completions", json=body, headers=headers)
    with trio.fail_after(5):
        while True:  # the cache writer stores the answer a moment after it ended
            again = await client.post(f"{gateway}/v1/chat/completions", json=body, headers=headers)
            if again.headers["x-ntonix-cache"] == "hit":
                break
            await trio.sleep(0.01)

    assert (await client.get(f"{gateway}/ntonix/usage")).status_code == 401
    usage = (await client.get(f"{gateway}/ntonix/usage", headers=ADMIN)).json()
    team_a, team_b = usage["keys"]["team-a"], usage["keys"]["team-b"]
    assert team_a["total"]["completion"] == 100 and team_a["total"]["cached"] == 0
    assert team_a["minute"] == team_a["today"] == team_a["total"]
    assert team_b["total"]["completion"] >= 200  # its own answer and the miss before the hit
    assert team_b["models"]["mock-llm"]["total"]["cached"] > 100  # prompt + completion served
    assert team_a["total"]["estimated"] == 0

    metrics = (await client.get(f"{gateway}/metrics", headers=ADMIN)).text
    assert 'ntonix_tokens_total{key="team-a",kind="completion",model="mock-llm"} 100.0' in metrics
    assert 'ntonix_tokens_total{key="team-b",kind="cached",model="mock-llm"}' in metrics
    assert "sk-team" not in metrics
