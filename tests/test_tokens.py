"""Token accounting with real clients: the counts are the backend's usage, and a client gets
exactly the bytes it would have got without the gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import trio
import trio.lowlevel

from ntonix.config import AuthSettings, CacheSettings, Config, KeySettings, LogSettings
from tests.conftest import StartGatewayWith, StartMock
from tests.support import backend, chat, wait_until

CHAT = "/v1/chat/completions"
KEY = KeySettings(name="team-a", key="sk-team-a")
AS_TEAM = {"authorization": "Bearer sk-team-a"}


def tokens_config(url: str, log: Path, *, cache: bool = False) -> Config:
    return Config(
        backends=(backend(url, "a"),),
        auth=AuthSettings(keys=(KEY,)),
        cache=CacheSettings(enabled=cache),
        log=LogSettings(access_log=str(log)),
    )


async def team_gateway(
    start_gateway_with: StartGatewayWith, url: str, tmp_path: Path, *, cache: bool = False
) -> tuple[str, Path]:
    """A gateway whose one key is team-a's, logging to tmp_path/access.log: its URL and log."""
    log = tmp_path / "access.log"
    return await start_gateway_with(tokens_config(url, log, cache=cache)), log


def team_sdk(gateway: str) -> openai.AsyncOpenAI:
    """The OpenAI SDK as team-a, no retries: one request is one access-log line."""
    return openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="sk-team-a", max_retries=0)


def lines_of(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


async def logged(log: Path, count: int) -> list[dict[str, Any]]:
    """The first `count` access-log lines, once they are written."""
    await wait_until(lambda: len(lines_of(log)) >= count)
    return [json.loads(line) for line in lines_of(log)[:count]]


def usage_of_sse(body: bytes) -> dict[str, int]:
    for event in body.split(b"\n\n"):
        if b'"usage"' in event:
            usage: dict[str, int] = json.loads(event.removeprefix(b"data: "))["usage"]
            return usage
    raise AssertionError("no usage event")


async def test_a_stream_whose_client_did_not_ask_for_usage_is_counted_and_looks_untouched(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    mock = await start_mock(tokens=12)
    gateway, log = await team_gateway(start_gateway_with, mock.url, tmp_path)
    request = chat("count me")
    direct = await client.post(f"{mock.url}{CHAT}", json=request)
    through = await client.post(f"{gateway}{CHAT}", json=request, headers=AS_TEAM)
    assert through.content == direct.content  # no usage event: the client did not ask
    assert b'"usage"' not in through.content
    asked = await client.post(
        f"{mock.url}{CHAT}", json={**request, "stream_options": {"include_usage": True}}
    )
    usage = usage_of_sse(asked.content)
    (line,) = await logged(log, 1)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    # Counted, not estimated: the backend was asked for its usage all the same.
    assert line["completion_tokens"] == 12 and line["tokens_estimated"] is False
    assert line["key"] == "team-a"


async def test_a_stream_whose_client_asked_keeps_its_usage_event(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, tmp_path: Path
) -> None:
    mock = await start_mock(tokens=9)
    gateway, log = await team_gateway(start_gateway_with, mock.url, tmp_path)
    sdk = team_sdk(gateway)
    stream = await sdk.chat.completions.create(
        model="mock-llm",
        messages=[{"role": "user", "content": "usage please"}],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 9
    (line,) = await logged(log, 1)
    assert line["prompt_tokens"] == usage.prompt_tokens
    assert line["completion_tokens"] == usage.completion_tokens


async def test_without_request_stream_usage_the_stream_is_estimated(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    mock = await start_mock(tokens=7)
    log = tmp_path / "access.log"
    config = tokens_config(mock.url, log)
    config = Config(
        backends=config.backends,
        auth=config.auth,
        cache=config.cache,
        log=config.log,
        usage=type(config.usage)(request_stream_usage=False),
    )
    gateway = await start_gateway_with(config)
    await client.post(f"{gateway}{CHAT}", json=chat("guess"), headers=AS_TEAM)
    (line,) = await logged(log, 1)
    assert line["completion_tokens"] == 7 and line["tokens_estimated"] is True


async def test_json_and_ollama_ndjson_count_what_the_backend_reported(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, tmp_path: Path
) -> None:
    mock = await start_mock(tokens=5)
    gateway, log = await team_gateway(start_gateway_with, mock.url, tmp_path)
    sdk = team_sdk(gateway)
    whole = await sdk.chat.completions.create(
        model="mock-llm", messages=[{"role": "user", "content": "json"}]
    )
    assert whole.usage is not None
    ollama_client = ollama.AsyncClient(host=gateway, headers=AS_TEAM)
    last = None
    async for part in await ollama_client.chat(
        model="mock-llm", messages=[{"role": "user", "content": "ndjson"}], stream=True
    ):
        last = part
    assert last is not None and last.done
    first, second = await logged(log, 2)
    assert (first["prompt_tokens"], first["completion_tokens"]) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    assert (second["prompt_tokens"], second["completion_tokens"]) == (
        last.prompt_eval_count,
        last.eval_count,
    )
    assert not first["tokens_estimated"] and not second["tokens_estimated"]


async def test_a_client_that_leaves_mid_stream_is_charged_an_estimate(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    mock = await start_mock(tokens=200, token_delay=0.01)
    gateway, log = await team_gateway(start_gateway_with, mock.url, tmp_path)
    words = 0
    async with client.stream("POST", f"{gateway}{CHAT}", json=chat(), headers=AS_TEAM) as stream:
        async for line in stream.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                words += 1
            if words == 5:
                break
    (line,) = await logged(log, 1)
    assert line["outcome"] == "client_disconnected"
    assert line["tokens_estimated"] is True
    assert 5 <= line["completion_tokens"] < 200
    assert line["prompt_tokens"] > 0


async def test_a_cache_hit_replays_what_the_first_client_saw_and_counts_as_cached(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    mock = await start_mock(tokens=6)
    gateway, log = await team_gateway(start_gateway_with, mock.url, tmp_path, cache=True)
    request = chat("cache me")
    first = await client.post(f"{gateway}{CHAT}", json=request, headers=AS_TEAM)
    await trio.lowlevel.checkpoint()
    second = await eventually_hit(client, f"{gateway}{CHAT}", request)
    assert second.content == first.content and b'"usage"' not in second.content
    assert mock.stats["requests"] == 1
    lines = await logged(log, 2)
    miss = next(line for line in lines if line["cache"] == "miss")
    hit = next(line for line in lines if line["cache"] == "hit")
    assert (hit["prompt_tokens"], hit["completion_tokens"]) == (
        miss["prompt_tokens"],
        miss["completion_tokens"],
    )
    assert miss["completion_tokens"] == 6


async def eventually_hit(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> httpx.Response:
    """The cache writer stores a finished flight a moment later: ask until it is a hit."""
    with trio.fail_after(5):
        while True:
            response = await client.post(url, json=body, headers=AS_TEAM)
            if response.headers["x-ntonix-cache"] == "hit":
                return response
            await trio.sleep(0.01)


async def test_a_coalesced_request_counts_the_shared_answer_as_cached(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, tmp_path: Path
) -> None:
    mock = await start_mock(tokens=20, token_delay=0.02)
    gateway, log = await team_gateway(start_gateway_with, mock.url, tmp_path, cache=True)
    sdk = team_sdk(gateway)
    labels: list[str] = []

    async def ask() -> None:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="mock-llm", messages=[{"role": "user", "content": "shared"}], temperature=0
        )
        labels.append(raw.headers["x-ntonix-cache"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await wait_until(lambda: mock.stats["active"] == 1)
        nursery.start_soon(ask)
    assert sorted(labels) == ["coalesced", "miss"] and mock.stats["requests"] == 1
    lines = await logged(log, 2)
    by_cache = {line["cache"]: line for line in lines}
    assert by_cache["coalesced"]["completion_tokens"] == by_cache["miss"]["completion_tokens"] == 20
