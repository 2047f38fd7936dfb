"""https backends: verified against the system CAs plus `ca_file`; `tls_verify = false` only
on purpose, and said so at start-up."""

from __future__ import annotations

import logging
import ssl
from contextlib import suppress
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from ntonix.config import BackendSettings, CacheSettings, Config
from tests.conftest import StartGatewayWith

ANSWER = b'{"object": "list", "data": [{"id": "tls-model", "object": "model"}]}'


async def _answer(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """One HTTP/1.1 answer per request head, enough for the gateway's client."""
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        received = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            received += data
            while b"\r\n\r\n" in received:
                _, _, received = received.partition(b"\r\n\r\n")
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                await stream.send_all(head + b"content-length: %d\r\n\r\n" % len(ANSWER) + ANSWER)


async def _https_backend(nursery: trio.Nursery, ca: trustme.CA) -> str:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, _answer, 0, context, host="127.0.0.1")
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    return f"https://127.0.0.1:{port}"


def _config(url: str, **backend: object) -> Config:
    return Config(
        backends=(BackendSettings(name="secure", url=url, **backend),),  # type: ignore[arg-type]
        cache=CacheSettings(enabled=False),
    )


async def test_a_backend_signed_by_ca_file_is_trusted(
    nursery: trio.Nursery,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    url = await _https_backend(nursery, ca)
    gateway = await start_gateway_with(_config(url, ca_file=str(ca_file)))
    response = await client.get(f"{gateway}/v1/files")
    assert response.status_code == 200
    assert response.content == ANSWER


async def test_an_unverified_backend_is_a_502_never_a_silent_downgrade(
    nursery: trio.Nursery, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    url = await _https_backend(nursery, trustme.CA())
    gateway = await start_gateway_with(_config(url))
    response = await client.get(f"{gateway}/v1/files")
    assert response.status_code == 502
    assert "certificate verification failed" in response.json()["error"]["message"]


async def test_tls_verify_false_works_and_is_logged_as_a_warning_at_start(
    nursery: trio.Nursery,
    start_gateway_with: StartGatewayWith,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = await _https_backend(nursery, trustme.CA())
    with caplog.at_level(logging.WARNING, logger="ntonix"):
        gateway = await start_gateway_with(_config(url, tls_verify=False))
    assert any("tls_verify = false" in r.getMessage() for r in caplog.records)
    response = await client.get(f"{gateway}/v1/files")
    assert response.status_code == 200
