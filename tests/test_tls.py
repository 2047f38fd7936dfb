"""TLS termination (HTTP/1.1 and HTTP/2), what the TLS port refuses, and the send timeout.

Certificates come from trustme, made afresh in each test's tmp_path; none is ever committed.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest
import trio
import trustme

from mocks.answers import is_generation
from mocks.llm import MockLLM, MockOptions, serve_mock
from mocks.playback import Connection, Outcome
from mocks.replies import Request
from ntonix.config import Config
from ntonix.server import hypercorn_config, serve
from ntonix.tls import MOZILLA_INTERMEDIATE_CIPHERS
from tests.conftest import RunningMock, StartMock
from tests.support import (
    PYTHON,
    Spawn,
    backend,
    chat,
    gateway_config,
    pool_totals,
    status,
    wait_until,
)

# The TLS 1.0/1.1 clients are deprecated in Python: that is the point of them here.
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
# The contract is 100 ms; tests allow more on a loaded CI machine (as test_cancellation does).
GENEROUS_CLOSE_BOUND = 0.5
RUNNING_ON = rb"Running on (https://127\.0\.0\.1:(\d+))"
CHACHA20_TLS12 = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"


@attrs.frozen
class Certs:
    ca: trustme.CA
    certfile: Path
    keyfile: Path

    def client_context(self, *alpn: str) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if alpn:
            context.set_alpn_protocols(list(alpn))
        return context

    def legacy_client_context(self, version: ssl.TLSVersion) -> ssl.SSLContext:
        """A client that speaks at most `version`; SECLEVEL=0 lets OpenSSL 3 even try."""
        context = self.client_context()
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    certfile, keyfile = tmp_path / "server.pem", tmp_path / "server.key"
    certfile.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(keyfile)
    return Certs(ca, certfile, keyfile)


async def _start_tls_gateway(
    nursery: trio.Nursery, certs: Certs, mock: RunningMock, **options: float
) -> str:
    """`ntonix serve --certfile --keyfile`, in-process: the code path the command takes."""
    config: Config = gateway_config(backend(mock.url, "m"))
    run = partial(
        serve,
        config,
        ["127.0.0.1:0"],
        certfile=str(certs.certfile),
        keyfile=str(certs.keyfile),
        shutdown_trigger=trio.sleep_forever,
        **options,
    )
    urls: list[str] = await nursery.start(run)
    assert urls[0].startswith("https://")
    return urls[0]


def _port(url: str) -> int:
    port = httpx.URL(url).port
    assert port is not None
    return port


async def _handshake(port: int, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1", https_compatible=True)
    with trio.fail_after(10):
        await stream.do_handshake()
    return stream


async def _refused(port: int, context: ssl.SSLContext) -> ssl.SSLError:
    """The handshake fails; returns OpenSSL's reason."""
    with pytest.raises(trio.BrokenResourceError) as failed:
        await _handshake(port, context)
    assert isinstance(failed.value.__cause__, ssl.SSLError), failed.value.__cause__
    return failed.value.__cause__


async def _stream_chat(
    url: str, certs: Certs, *, http2: bool, prompt: str = "Hello"
) -> tuple[str, list[bytes]]:
    verify = certs.client_context()
    async with (
        httpx.AsyncClient(http1=not http2, http2=http2, verify=verify, timeout=10) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=chat(prompt)) as response,
    ):
        assert response.status_code == 200
        return response.http_version, [chunk async for chunk in response.aiter_raw()]


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
async def test_streams_a_chat_completion_over_tls(
    http2: bool, certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    mock = await start_mock(tokens=20, token_delay=0.01)
    gateway = await _start_tls_gateway(nursery, certs, mock)
    version, chunks = await _stream_chat(gateway, certs, http2=http2)
    assert version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert len(chunks) > 1  # streamed, not buffered into one piece
    body = b"".join(chunks)
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b'"content"') >= 20
    assert mock.stats["completed"] == 1


class H2Client:
    """A bare HTTP/2 client (h2 over a trio SSL stream) that can reset a single stream, which
    httpx cannot: httpcore never sends RST_STREAM."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()

    async def flush(self) -> None:
        if data := self.h2.data_to_send():
            await self.stream.send_all(data)

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "https")]
        headers += [(":authority", "localhost"), ("content-type", "application/json")]
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=True)
        await self.flush()
        return stream_id

    async def reset(self, stream_id: int) -> float:
        """RST_STREAM(CANCEL), as a browser or an SDK sends when the user stops a stream."""
        self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        await self.flush()
        return time.time()

    async def read_until(
        self, done: Callable[[h2.events.Event], bool], timeout: float = 5
    ) -> list[h2.events.Event]:
        seen: list[h2.events.Event] = []
        with trio.fail_after(timeout):
            while not any(done(event) for event in seen):
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"connection closed; events so far: {seen}")
                for event in self.h2.receive_data(data):
                    seen.append(event)
                    if isinstance(event, h2.events.DataReceived):
                        self.h2.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                await self.flush()
        return seen


async def test_http2_stream_reset_cancels_the_upstream_and_keeps_the_connection(
    certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    mock = await start_mock(tokens=200, token_delay=0.02)
    gateway = await _start_tls_gateway(nursery, certs, mock)
    stream = await _handshake(_port(gateway), certs.client_context("h2"))
    assert stream.selected_alpn_protocol() == "h2"
    client = H2Client(stream)
    first = await client.request("POST", "/v1/chat/completions", json.dumps(chat()).encode())
    await client.read_until(
        lambda event: isinstance(event, h2.events.DataReceived) and b'"content"' in event.data
    )
    reset_at = await client.reset(first)

    await wait_until(lambda: mock.stats["client_disconnects"] == 1, timeout=2)
    assert mock.stats["disconnects"][-1]["at"] - reset_at < GENEROUS_CLOSE_BOUND
    await wait_until(lambda: mock.stats["active"] == 0, timeout=2)
    assert mock.stats["completed"] == 0

    # Only the stream was cancelled: the same connection serves the next request.
    second = await client.request("GET", "/ntonix/health")
    events = await client.read_until(
        lambda event: isinstance(event, h2.events.StreamEnded) and event.stream_id == second
    )
    (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert (b":status", b"200") in response.headers
    await stream.aclose()


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"]
)
async def test_tls_below_1_2_is_refused(
    version: ssl.TLSVersion, certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    legacy = certs.legacy_client_context(version)
    # Control: this client does complete a handshake with a server that still allows it, so
    # the refusal below is the gateway's doing and not a client that cannot speak at all.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(certs.certfile, certs.keyfile)
    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, _hold, 0, permissive, host="127.0.0.1")
    )
    control_port = listeners[0].transport_listener.socket.getsockname()[1]
    try:
        control = await _handshake(control_port, legacy)
    except trio.BrokenResourceError as error:
        pytest.skip(f"this OpenSSL cannot speak {version.name} at all: {error.__cause__}")
    assert control.version() == version.name.replace("_", ".")
    await control.aclose()

    mock = await start_mock()
    gateway = await _start_tls_gateway(nursery, certs, mock)
    # Trio drops the connection without flushing OpenSSL's protocol_version alert, so the
    # client sees an EOF in the handshake rather than the alert.
    await _refused(_port(gateway), legacy)


async def _hold(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Handshake (an SSLStream only does it on first use), then keep the connection open."""
    with suppress(trio.BrokenResourceError):
        await stream.do_handshake()
        await trio.sleep_forever()


async def test_plaintext_http_on_the_tls_port_gets_no_http_response(
    certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    mock = await start_mock()
    gateway = await _start_tls_gateway(nursery, certs, mock)
    tcp = await trio.open_tcp_stream("127.0.0.1", _port(gateway))
    await tcp.send_all(b"GET /ntonix/health HTTP/1.1\r\nhost: localhost\r\n\r\n")
    received = b""
    with trio.fail_after(10):  # closed, not left hanging until the handshake timeout
        try:
            while data := await tcp.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass  # a reset is as good as a close
    await tcp.aclose()
    assert not received.startswith(b"HTTP/")
    assert received == b"" or received[0] == 0x15  # nothing, or a TLS alert record
    assert mock.stats["requests"] == 0


async def test_chacha20_is_offered_on_tls_1_2(
    certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    mock = await start_mock()
    gateway = await _start_tls_gateway(nursery, certs, mock)
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CHACHA20_TLS12)  # the ECDSA or RSA one, whichever the key is
    stream = await _handshake(_port(gateway), context)
    name, version, _ = stream.cipher() or ("", "", 0)
    assert name.endswith("CHACHA20-POLY1305")
    assert version == "TLSv1.2"
    await stream.aclose()


def test_the_listening_sockets_carry_a_send_timeout_their_connections_inherit() -> None:
    settings = hypercorn_config(
        gateway_config(backend("http://127.0.0.1:9", "m")),
        ["127.0.0.1:0", "[::1]:0"],
        send_timeout=7.5,
    )
    sockets = settings.create_sockets()
    listeners = [*sockets.insecure_sockets, *sockets.secure_sockets]
    assert len(listeners) == 2
    for listener in listeners:
        with listener:
            listener.listen(1)
            listener.setblocking(True)
            assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7500
            address = listener.getsockname()[:2]
            with socket.create_connection(address, timeout=5), listener.accept()[0] as accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7500


class FloodingMock(MockLLM):
    """Each SSE event of a generation carries a 64 KiB comment line first, so that a client
    that does not read fills every buffer on the way within a few dozen events."""

    async def respond(self, request: Request, connection: Connection) -> Outcome:
        if is_generation(request):
            connection = _Padded(connection)
        return await super().respond(request, connection)


@attrs.frozen
class _Padded:
    connection: Connection
    padding: bytes = b": " + b"x" * 65536 + b"\n"

    def start(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        self.connection.start(status, headers)

    async def write(self, data: bytes, *, last: bool) -> bool:
        return await self.connection.write(self.padding + data if data else data, last=last)

    async def wait_disconnect(self) -> None:
        await self.connection.wait_disconnect()


async def test_a_client_that_stops_reading_is_disconnected_and_its_upstream_closed(
    nursery: trio.Nursery,
) -> None:
    # A token delay, however small, lets the mock notice the disconnect between two writes:
    # Hypercorn's send does not even checkpoint once the connection is gone.
    mock = FloodingMock(MockOptions(tokens=100_000, token_delay=0.001, ttft=0))
    mock_port = await nursery.start(partial(serve_mock, mock))
    config = gateway_config(backend(f"http://127.0.0.1:{mock_port}", "m"))
    run = partial(
        serve, config, ["127.0.0.1:0"], shutdown_trigger=trio.sleep_forever, send_timeout=1.0
    )
    gateway = (await nursery.start(run))[0]

    # Closed on the way out whatever happens: were the test to fail, the gateway's blocked write
    # would otherwise keep it from shutting down.
    with trio.socket.socket() as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window shuts soon
        await reader.connect(("127.0.0.1", _port(gateway)))
        body = json.dumps(chat()).encode()
        head = "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        await reader.send(head.encode() + body)
        await wait_until(lambda: mock.stats()["active"] == 1, timeout=5)
        # Never read again. Without TCP_USER_TIMEOUT the gateway's shielded write would wait
        # for ever; with it, the kernel aborts the connection about a second after the window
        # shut, the gateway sees the disconnect and closes the upstream.
        took = await wait_until(lambda: mock.stats()["client_disconnects"] == 1, timeout=20)
        assert took >= 0.5  # the kernel gave up on the client, not something else sooner
        await wait_until(lambda: mock.stats()["active"] == 0, timeout=2)

    async with httpx.AsyncClient(timeout=10) as client:
        snapshot = await status(client, gateway)
        assert pool_totals(snapshot)["in_use"] == 0
        assert all(backend["active_requests"] == 0 for backend in snapshot["backends"])


# --- The commands, as processes ------------------------------------------------------------


def _config_file(tmp_path: Path, mock: RunningMock) -> Path:
    path = tmp_path / "ntonix.toml"
    path.write_text(f'[cache]\nenabled = false\n[[backends]]\nname = "m"\nurl = "{mock.url}"\n')
    return path


@pytest.mark.parametrize("workers", [1, 2])
async def test_ntonix_serve_with_certfile_serves_its_own_tls_context(
    workers: int, tmp_path: Path, certs: Certs, start_mock: StartMock, spawn: Spawn
) -> None:
    mock = await start_mock()
    gateway = await spawn(
        *[PYTHON, "-m", "ntonix.cli", "serve", "--bind", "127.0.0.1:0"],
        *["--config", str(_config_file(tmp_path, mock)), "--workers", str(workers)],
        *["--certfile", str(certs.certfile), "--keyfile", str(certs.keyfile)],
    )
    match = await gateway.wait_for(RUNNING_ON)
    url, port = match.group(1).decode(), int(match.group(2))
    for http2 in (False, True):
        version, chunks = await _stream_chat(url, certs, http2=http2, prompt=f"h2={http2}")
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n"), version
    # ChaCha20 on TLS 1.2 tells our context from Hypercorn's, whichever worker accepts.
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CHACHA20_TLS12)
    for _ in range(4):
        stream = await _handshake(port, context)
        await stream.aclose()
    await _refused(port, certs.legacy_client_context(ssl.TLSVersion.TLSv1_1))
    assert b"Traceback" not in gateway.output


async def test_plain_hypercorn_command_keeps_its_own_context_which_also_refuses_old_tls(
    tmp_path: Path, certs: Certs, start_mock: StartMock, spawn: Spawn
) -> None:
    mock = await start_mock()
    gateway = await spawn(
        *[PYTHON, "-m", "hypercorn", "--worker-class", "trio", "--bind", "127.0.0.1:0"],
        *["--certfile", str(certs.certfile), "--keyfile", str(certs.keyfile), "ntonix:app"],
        env={"NTONIX_CONFIG": str(_config_file(tmp_path, mock))},
    )
    match = await gateway.wait_for(RUNNING_ON)
    url, port = match.group(1).decode(), int(match.group(2))
    version, chunks = await _stream_chat(url, certs, http2=True)
    assert version == "HTTP/2"
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
    for legacy in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        await _refused(port, certs.legacy_client_context(legacy))
    # The documented difference: Hypercorn's TLS 1.2 list is ECDHE+AESGCM only.
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CHACHA20_TLS12)
    await _refused(port, context)


def test_mozilla_intermediate_ciphers_are_all_known_to_openssl() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers(MOZILLA_INTERMEDIATE_CIPHERS)
    names = {cipher["name"] for cipher in context.get_ciphers()}
    assert set(MOZILLA_INTERMEDIATE_CIPHERS.split(":")) <= names


async def test_a_bad_key_file_is_one_line_and_exit_1(
    tmp_path: Path, certs: Certs, start_mock: StartMock, spawn: Spawn
) -> None:
    mock = await start_mock()
    other_key = tmp_path / "other.key"
    certs.ca.issue_cert("localhost").private_key_pem.write_to_path(other_key)
    gateway = await spawn(
        *[PYTHON, "-m", "ntonix.cli", "serve", "--bind", "127.0.0.1:0"],
        *["--config", str(_config_file(tmp_path, mock))],
        *["--certfile", str(certs.certfile), "--keyfile", str(other_key)],
    )
    with trio.fail_after(20):
        assert await gateway.process.wait() == 1
    await trio.sleep(0.1)  # the last of the output
    assert b"ntonix: cannot use --certfile/--keyfile" in gateway.output
    assert b"Traceback" not in gateway.output
