"""A response sent before its request's body was read (an early refusal) keeps the connection:
the rest of a small body is read and dropped, then the next request on it is served
(protocol_h11.py); a body past UNREAD_BODY_LIMIT closes the connection unread."""

from __future__ import annotations

import json
from contextlib import suppress

import pytest
import trio

from ntonix.config import AuthSettings, BackendSettings, CacheSettings, Config
from ntonix.protocol_h11 import UNREAD_BODY_LIMIT
from tests.conftest import StartGatewayWith, StartMock
from tests.support import RawClient, chat

CHAT = "/v1/chat/completions"
KEY = "sk-right"


async def _response(client: RawClient, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """The next response on `client`'s connection (content-length bodies only): its status
    and body, taken out of `client.received`; None when the gateway closed instead."""

    async def fill() -> bool:
        try:
            data = await client.stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset: the gateway closed with bytes unread
            data = b""
        client.received += data
        return bool(data)

    with trio.fail_after(timeout):
        while b"\r\n\r\n" not in client.received:
            if not await fill():
                assert not client.received, client.received
                return None
        head, _, client.received = client.received.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(fields["content-length"])
        while len(client.received) < length:
            assert await fill(), "closed inside a body"
        body, client.received = client.received[:length], client.received[length:]
        return int(lines[0].split()[1]), body


def _head(length: int | None, key: str) -> bytes:
    framing = "transfer-encoding: chunked" if length is None else f"content-length: {length}"
    return (
        f"POST {CHAT} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


def _request(key: str) -> bytes:
    body = json.dumps(chat(stream=False)).encode()
    return _head(len(body), key) + body


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


@pytest.fixture
async def gateway(start_mock: StartMock, start_gateway_with: StartGatewayWith) -> str:
    mock = await start_mock()
    return await start_gateway_with(
        Config(
            backends=(BackendSettings(name="a", url=mock.url),),
            auth=AuthSettings(api_keys=(KEY,)),
            cache=CacheSettings(enabled=False),
        )
    )


def _padded(size: int) -> bytes:
    """A JSON chat body of exactly `size` bytes."""
    body = json.dumps(chat(stream=False, user="")).encode()
    return body.replace(b'"user": ""', b'"user": "' + b"x" * (size - len(body)) + b'"')


async def test_a_refused_request_s_body_sent_after_the_answer_keeps_the_connection(
    gateway: str,
) -> None:
    body = _padded(20_000)
    connection = await RawClient.connect(gateway)
    await connection.stream.send_all(_head(len(body), "sk-wrong"))
    assert (await _response(connection) or (0,))[0] == 401
    await connection.stream.send_all(body[:7000])
    await trio.sleep(0.05)  # the body in parts, after the answer
    await connection.stream.send_all(body[7000:])
    await connection.stream.send_all(_request(KEY))
    answer = await _response(connection)
    assert answer is not None and answer[0] == 200, answer


async def test_a_chunked_body_and_the_next_request_in_one_write(gateway: str) -> None:
    connection = await RawClient.connect(gateway)
    await connection.stream.send_all(_head(None, "sk-wrong"))
    assert (await _response(connection) or (0,))[0] == 401
    await connection.stream.send_all(_chunked(_padded(30_000)) + _request(KEY))
    answer = await _response(connection)
    assert answer is not None and answer[0] == 200, answer


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_past_the_limit_closes_the_connection_unread(
    gateway: str, chunked: bool
) -> None:
    body = _padded(UNREAD_BODY_LIMIT + 1)
    connection = await RawClient.connect(gateway)
    await connection.stream.send_all(_head(None if chunked else len(body), "sk-wrong"))
    assert (await _response(connection) or (0,))[0] == 401
    # A chunked body is counted as it comes; a content-length one is refused at once.
    with suppress(trio.BrokenResourceError):
        await connection.stream.send_all(_chunked(body) if chunked else body)
        await connection.stream.send_all(_request(KEY))
    assert await _response(connection) is None
