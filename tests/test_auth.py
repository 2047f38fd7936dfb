"""Client API keys and per-key limits at the front door."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from ntonix.config import AuthSettings, BackendSettings, CacheSettings, Config
from tests.conftest import StartGatewayWith, StartMock
from tests.support import RawClient, chat, wait_until

CHAT = "/v1/chat/completions"


def _config(url: str, **auth: object) -> Config:
    return Config(
        backends=(BackendSettings(name="a", url=url, api_key="backend-secret"),),
        auth=AuthSettings(**auth),  # type: ignore[arg-type]
        cache=CacheSettings(enabled=False),
    )


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_without_keys_everyone_is_served(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(_config(mock.url))
    response = await client.post(f"{gateway}{CHAT}", json=chat(stream=False))
    assert response.status_code == 200


async def test_a_missing_or_wrong_key_is_401_and_never_reaches_a_backend(
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops\nsk-from-file\n")
    mock = await start_mock()
    gateway = await start_gateway_with(
        _config(mock.url, api_keys=("sk-inline",), api_keys_file=str(keys_file))
    )
    for headers in ({}, _bearer("sk-wrong"), {"authorization": "Basic sk-inline"}):
        response = await client.post(f"{gateway}{CHAT}", json=chat(stream=False), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert "sk-" not in response.text.replace("sk-wrong", "")
    assert (await client.get(f"{gateway}/v1/models")).status_code == 401
    assert mock.stats["requests"] == 0
    for key in ("sk-inline", "sk-from-file"):
        response = await client.post(
            f"{gateway}{CHAT}", json=chat(key, stream=False), headers=_bearer(key)
        )
        assert response.status_code == 200
        # The client's credentials stop at the gateway; the backend gets its own.
        assert mock.stats["last_headers"]["authorization"] == "Bearer backend-secret"


async def test_requests_per_minute_is_per_key_with_retry_after(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway_with(
        _config(mock.url, api_keys=("greedy", "polite"), requests_per_minute=2)
    )
    statuses = []
    for index in range(3):
        response = await client.post(
            f"{gateway}{CHAT}", json=chat(f"q{index}", stream=False), headers=_bearer("greedy")
        )
        statuses.append(response.status_code)
    assert statuses == [200, 200, 429]
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"
    # The greedy key does not starve another one.
    polite = await client.post(
        f"{gateway}{CHAT}", json=chat(stream=False), headers=_bearer("polite")
    )
    assert polite.status_code == 200
    assert mock.stats["requests"] == 3


async def test_max_concurrent_per_key_refuses_the_extra_stream_until_one_ends(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=200, token_delay=0.02)
    gateway = await start_gateway_with(
        _config(mock.url, api_keys=("one", "two"), max_concurrent_per_key=1)
    )
    held = await RawClient.connect(gateway)
    await held.send_request("POST", CHAT, chat("long"), headers=_bearer("one"))
    await held.read_until(b'"content"')
    refused = await client.post(f"{gateway}{CHAT}", json=chat(stream=False), headers=_bearer("one"))
    assert refused.status_code == 429
    other = await client.post(
        f"{gateway}{CHAT}",
        json=chat(stream=False),
        headers={**_bearer("two"), "x-mock-tokens": "2"},
    )
    assert other.status_code == 200
    await held.hang_up()
    await wait_until(lambda: mock.stats["active"] == 0)
    with trio.fail_after(5):
        again = await client.post(
            f"{gateway}{CHAT}",
            json=chat(stream=False),
            headers={**_bearer("one"), "x-mock-tokens": "2"},
        )
    assert again.status_code == 200
