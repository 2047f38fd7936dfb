"""The shared tier on a server that checks who connects: valkeys:// verified against
`[shared] ca_file`, a password in the URL, an ACL user, a `password_file`. A wrong CA or a wrong
password takes the tier down, logged once, and never a request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import StartGatewayWith, StartMock
from tests.shared_support import (
    ACL_PASSWORD,
    ACL_USER,
    PASSWORD,
    TlsServer,
    needs_redis_server,
    tier_config,
    tier_toml,
)
from tests.support import RUNNING_ON, SERVE, Spawn, chat, eventually
from tests.test_shared_tier import cache_stats, stored_in_tier, tier_up

pytestmark = needs_redis_server

CHAT = "/v1/chat/completions"


@pytest.fixture
async def server(spawn: Spawn, tmp_path: Path) -> AsyncIterator[TlsServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = TlsServer(spawn, directory)
    await server.start()
    yield server


async def test_valkeys_checked_against_ca_file_is_one_cache_for_two_instances(
    spawn: Spawn,
    tmp_path: Path,
    start_mock: StartMock,
    client: httpx.AsyncClient,
    server: TlsServer,
) -> None:
    mock = await start_mock()
    url = f"valkeys://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{server.tls_port}/0"
    instances = []
    for name in ("a", "b"):
        config = tmp_path / f"{name}.toml"
        config.write_text(tier_toml(mock.url, url, shared=f'ca_file = "{server.ca_file}"\n'))
        instances.append(await spawn(*SERVE, "--config", str(config)))
    a, b = [(await gateway.wait_for(RUNNING_ON)).group(1).decode() for gateway in instances]

    first = await client.post(f"{a}{CHAT}", json=chat("over TLS"))
    await stored_in_tier(client, a)
    second = await client.post(f"{b}{CHAT}", json=chat("over TLS"))

    assert (first.headers["x-ntonix-cache"], second.headers["x-ntonix-cache"]) == ("miss", "hit")
    assert second.content == first.content
    assert mock.stats["requests"] == 1
    assert (await cache_stats(client, b))["l2_hits"] == 1


# How each form of credentials reaches the server: (url's user:password@, password_file).
CREDENTIALS = {
    "password in the url": (f":{PASSWORD}@", ""),
    "acl user in the url": (f"{ACL_USER}:{ACL_PASSWORD}@", ""),
    "password_file": ("", PASSWORD),
    "acl user with password_file": (f"{ACL_USER}@", ACL_PASSWORD),
}


@pytest.mark.parametrize("tls", [False, True], ids=["valkey", "valkeys"])
@pytest.mark.parametrize("credentials", list(CREDENTIALS))
async def test_every_form_of_credentials_reaches_the_tier(
    tmp_path: Path,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    server: TlsServer,
    credentials: str,
    tls: bool,
) -> None:
    mock = await start_mock()
    user, password = CREDENTIALS[credentials]
    password_file = ""
    if password:
        (tmp_path / "password").write_text(password + "\n")
        password_file = str(tmp_path / "password")
    scheme, port = ("valkeys", server.tls_port) if tls else ("valkey", server.port)
    config = tier_config(
        mock.url,
        f"{scheme}://{user}127.0.0.1:{port}/0",
        password_file=password_file,
        ca_file=str(server.ca_file) if tls else "",
    )
    gateway = await start_gateway_with(config)

    await client.post(f"{gateway}{CHAT}", json=chat("with credentials"))

    await stored_in_tier(client, gateway)
    assert await tier_up(client, gateway) == 1


async def _served_with_the_tier_down(client: httpx.AsyncClient, gateway: str) -> None:
    """Requests answered from the backend and L1 while the tier's state says it is down."""
    answers = [await client.post(f"{gateway}{CHAT}", json=chat("no tier")) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [answer.headers["x-ntonix-cache"] for answer in answers] == ["miss", "hit", "hit"]

    async def down() -> bool:
        return await tier_up(client, gateway) == 0

    await eventually(down)
    assert (await cache_stats(client, gateway))["l2_stored"] == 0


def _down_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [line for line in _messages(caplog) if line.startswith("shared tier down")]


@pytest.mark.parametrize(
    "wrong",
    ["an unknown ca", "a wrong password", "an unknown user"],
)
async def test_a_tier_that_refuses_the_gateway_is_down_logged_once_and_costs_no_request(
    tmp_path: Path,
    start_mock: StartMock,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    server: TlsServer,
    caplog: pytest.LogCaptureFixture,
    wrong: str,
) -> None:
    mock = await start_mock()
    ca_file = server.ca_file
    credentials = f"{ACL_USER}:{ACL_PASSWORD}@"
    if wrong == "an unknown ca":
        ca_file = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(ca_file)
    elif wrong == "a wrong password":
        credentials = ":not-the-password@"
    else:
        credentials = f"nobody:{ACL_PASSWORD}@"
    url = f"valkeys://{credentials}127.0.0.1:{server.tls_port}/0"
    with caplog.at_level(logging.INFO, logger="ntonix.shared"):
        gateway = await start_gateway_with(tier_config(mock.url, url, ca_file=str(ca_file)))
        await _served_with_the_tier_down(client, gateway)

        if wrong == "an unknown ca":
            await eventually(lambda: _logged(caplog, "shared tier: TLS with"))

    lines = _down_lines(caplog)
    assert len(lines) == 1, lines
    if wrong == "an unknown ca":
        (tls,) = [line for line in _messages(caplog) if line.startswith("shared tier: TLS")]
        assert "CERTIFICATE_VERIFY_FAILED" in tls and "ca_file" in tls
    else:
        assert "WRONGPASS" in lines[0]
    for line in _messages(caplog):
        assert ACL_PASSWORD not in line and "not-the-password" not in line


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


async def _logged(caplog: pytest.LogCaptureFixture, start: str) -> bool:
    return any(line.startswith(start) for line in _messages(caplog))
