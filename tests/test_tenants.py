"""Named keys ([[auth.keys]]): who may use which model, shown by name and never by secret."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from ntonix.config import AuthSettings, CacheSettings, Config, KeySettings, LogSettings
from tests.conftest import StartGatewayWith, StartMock
from tests.support import backend, chat, wait_until

CHAT = "/v1/chat/completions"


def tenants_config(url: str, *keys: KeySettings, access_log: str = "off", **auth: object) -> Config:
    return Config(
        backends=(backend(url, "a"),),
        auth=AuthSettings(keys=keys, **auth),  # type: ignore[arg-type]
        cache=CacheSettings(enabled=False),
        log=LogSettings(access_log=access_log),
    )


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_named_keys_and_plain_keys_both_let_in(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    gateway = await start_gateway_with(
        tenants_config(
            mock.url,
            KeySettings(name="team-a", key="sk-team-a"),
            KeySettings(name="team-b", key_sha256=digest),
            api_keys=("sk-plain",),
        )
    )
    for key in ("sk-team-a", "sk-hashed", "sk-plain"):
        response = await client.post(
            f"{gateway}{CHAT}", json=chat(stream=False), headers=bearer(key)
        )
        assert response.status_code == 200, key
    response = await client.post(f"{gateway}{CHAT}", json=chat(stream=False), headers=bearer("x"))
    assert response.status_code == 401


async def test_a_model_the_key_may_not_use_is_403_in_each_dialect(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, tmp_path: Path
) -> None:
    mock = await start_mock(models=("mock-llm", "other-model"))
    log = tmp_path / "access.log"
    gateway = await start_gateway_with(
        tenants_config(
            mock.url,
            KeySettings(name="narrow", key="sk-narrow", models=("mock-llm",)),
            access_log=str(log),
        )
    )
    sdk = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="sk-narrow", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await sdk.chat.completions.create(
            model="other-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.status_code == 403
    assert "other-model" in str(refused.value) and "narrow" in str(refused.value)
    allowed = await sdk.chat.completions.create(
        model="mock-llm", messages=[{"role": "user", "content": "hi"}]
    )
    assert allowed.choices[0].message.content
    # The model list shows only what the key may use.
    assert [m.id async for m in sdk.models.list()] == ["mock-llm"]

    ollama_client = ollama.AsyncClient(host=gateway, headers=bearer("sk-narrow"))
    with pytest.raises(ollama.ResponseError) as ollama_refused:
        await ollama_client.chat(model="other-model", messages=[{"role": "user", "content": "x"}])
    assert ollama_refused.value.status_code == 403
    # Ollama's own shape, {"error": "message"}: the client shows the message itself.
    assert ollama_refused.value.error == "The key 'narrow' may not use the model 'other-model'"
    assert mock.stats["requests"] == 1  # only the allowed one reached the backend

    await wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 4)
    text = log.read_text()
    assert "sk-narrow" not in text
    keys = {json.loads(line)["key"] for line in text.splitlines()}
    assert keys == {"narrow"}
