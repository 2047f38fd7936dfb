"""Hostile clients and failing backends, one table: what the client sees, and that nothing leaks.

Every case runs against one gateway configuration (docs/security.md): a mock backend for
`mock-llm` (max_concurrent 1, so a second request queues), a raw upstream for model `raw` that
misbehaves on request, an https upstream for model `tls` whose certificate nobody trusts, and
client API keys. After each case no request may be in flight at the gateway or the backends.
The whole table then runs against a spawned `ntonix serve` whose RSS must come back near its
baseline. Bytes an HTTP client library refuses to send go over raw sockets.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trustme

from mocks.llm import MockLLM, MockOptions, serve_mock
from ntonix.config import Config
from ntonix.server import serve
from tests.support import (
    PYTHON,
    RawClient,
    Spawn,
    chat,
    eventually,
    status,
    wait_for_queued,
    wait_until,
)

pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")

KEY = "k-good"
AUTH = ("authorization", f"Bearer {KEY}")
BODY_LIMIT = 256 * 1024
TEN_MB = 10 * 1024 * 1024
CHAT = "/v1/chat/completions"
RUNNING_ON = rb"Running on (http://127\.0\.0\.1:\d+)"


@attrs.frozen
class Seen:
    """What the client saw: status 0 means no HTTP response (it left, or TLS refused it)."""

    status: int
    body: bytes = b""
    closed: bool | None = None  # whether the server closed the connection after answering


@attrs.frozen
class Env:
    gateway: str
    client: httpx.AsyncClient  # carries the good key
    mock: MockLLM
    raw: RawUpstream
    tls_port: int | None = None  # the same gateway config behind TLS (in-process runs only)
    certs: trustme.CA | None = None


Act = Callable[[Env], Awaitable[Seen]]


@attrs.frozen
class Case:
    name: str
    act: Act
    status: int
    expect: bytes = b""  # must appear in the body the client saw
    reaches_mock: bool = False  # a refused request must never reach a backend
    closes: bool = False  # the gateway must close the connection after answering
    tls: bool = False  # needs the TLS listener


# --- Upstreams that misbehave in ways the mock does not ------------------------------------


class RawUpstream:
    """An HTTP/1.1 server on bare sockets; `x-raw-mode` picks the misbehaviour."""

    def __init__(self) -> None:
        self.active = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.active += 1
        try:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._answer(stream)
        finally:
            self.active -= 1
            await stream.aclose()

    async def _answer(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(65536)
            if not data:
                return
            head += data
        lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
        mode = fields.get(b"x-raw-mode", b"")
        if mode == b"garbage-sse":
            garbage = b"\x00\xff not sse at all\r\ndata: {broken json\n\nevent\n\n"
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(garbage), garbage)
            )
        elif mode == b"ten-mb":
            # One write of the whole 10 MB body: the gateway must relay it, not hold it.
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                b"content-length: %d\r\n\r\n" % TEN_MB + b"x" * TEN_MB
            )
        else:  # the health probe, and anything else
            body = json.dumps({"object": "list", "data": [{"id": "raw"}]}).encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )


async def _hold_tls(stream: trio.SSLStream[trio.SocketStream]) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.do_handshake()
        await trio.sleep_forever()


# --- Raw HTTP/1.1 -------------------------------------------------------------------------


def _head(method: str, target: str, *fields: tuple[str, str], key: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: gw", *(f"{n}: {v}" for n, v in fields)]
    if key:
        lines.append(": ".join(AUTH))
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _exchange(
    env: Env, *pieces: bytes, pause: float = 0.0, check_close: bool = False
) -> Seen:
    """Send `pieces` (pausing between them), then read one response."""
    url = httpx.URL(env.gateway)
    assert url.port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", url.port)
    async with stream:
        # The gateway may answer and close before it has all: a refusal mid-send is fine.
        with suppress(trio.BrokenResourceError):
            for index, piece in enumerate(pieces):
                if index and pause:
                    await trio.sleep(pause)
                await stream.send_all(piece)
        return await _read_response(stream, check_close=check_close)


async def _read_response(stream: trio.abc.Stream, *, check_close: bool) -> Seen:
    received = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in received:
            data = await _receive(stream)
            if not data:
                return Seen(0, received, closed=True)
            received += data
        head, body = received.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = int(fields.get(b"content-length", b"0"))
        while len(body) < length:
            data = await _receive(stream)
            if not data:
                break
            body += data
    closed = None
    if check_close:
        with trio.move_on_after(5):
            closed = await _receive(stream) == b""
    return Seen(int(lines[0].split()[1]), body, closed)


async def _receive(stream: trio.abc.Stream) -> bytes:
    try:
        return bytes(await stream.receive_some(65536))
    except trio.BrokenResourceError:  # a reset is as good as a close
        return b""


def raw(*pieces: bytes, pause: float = 0.0, check_close: bool = False) -> Act:
    return partial(_wrap_exchange, pieces=pieces, pause=pause, check_close=check_close)


async def _wrap_exchange(
    env: Env, *, pieces: tuple[bytes, ...], pause: float, check_close: bool
) -> Seen:
    return await _exchange(env, *pieces, pause=pause, check_close=check_close)


def post(content: bytes, *, path: str = CHAT, headers: dict[str, str] | None = None) -> Act:
    async def act(env: Env) -> Seen:
        response = await env.client.post(
            f"{env.gateway}{path}",
            content=content,
            headers={"content-type": "application/json", **(headers or {})},
        )
        return Seen(response.status_code, response.content)

    return act


def post_json(payload: object, **kwargs: dict[str, str]) -> Act:
    return post(json.dumps(payload).encode(), **kwargs)


def body_request(payload: object, *fields: tuple[str, str], target: str = CHAT) -> bytes:
    body = json.dumps(payload).encode()
    return _head("POST", target, ("content-length", str(len(body))), *fields) + body


# --- Acts that hang up at a chosen moment ---------------------------------------------------


async def _connect(env: Env) -> RawClient:
    return await RawClient.connect(env.gateway)


async def disconnect_during_body(env: Env) -> Seen:
    client = await _connect(env)
    await client.send_request("POST", CHAT, chat(), headers=dict([AUTH]), body_bytes_to_send=10)
    await trio.sleep(0.05)
    await client.hang_up()
    return Seen(0)


async def disconnect_in_queue(env: Env) -> Seen:
    holder = await _connect(env)
    await holder.send_request("POST", CHAT, chat(), headers={**dict([AUTH]), "x-mock-hang": "1"})
    await wait_until(lambda: env.mock.stats()["active"] == 1)
    waiter = await _connect(env)
    await waiter.send_request("POST", CHAT, chat("queued"), headers=dict([AUTH]))
    await wait_for_queued(env.client, env.gateway, 1)
    await waiter.hang_up()
    await wait_for_queued(env.client, env.gateway, 0)
    await holder.hang_up()
    return Seen(0)


async def disconnect_before_first_byte(env: Env) -> Seen:
    client = await _connect(env)
    await client.send_request("POST", CHAT, chat(), headers={**dict([AUTH]), "x-mock-hang": "1"})
    await wait_until(lambda: env.mock.stats()["active"] == 1)
    await client.hang_up()
    return Seen(0)


async def disconnect_mid_stream(env: Env) -> Seen:
    client = await _connect(env)
    headers = {**dict([AUTH]), "x-mock-tokens": "5000", "x-mock-token-delay": "0.005"}
    await client.send_request("POST", CHAT, chat(), headers=headers)
    await client.read_until(b'"content"')
    await client.hang_up()
    return Seen(200)


async def endless_stream_cut_by_client(env: Env) -> Seen:
    """A stream with no end in sight; the client reads 50 KB of it and closes."""
    headers = {"x-mock-tokens": "20000", "x-mock-token-delay": "0"}
    async with env.client.stream(
        "POST", f"{env.gateway}{CHAT}", json=chat(), headers=headers
    ) as response:
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received > 50_000:
                break
    return Seen(response.status_code)


async def ten_mb_chunk(env: Env) -> Seen:
    response = await env.client.post(
        f"{env.gateway}/v1/completions",
        json={"model": "raw", "prompt": "x"},
        headers={"x-raw-mode": "ten-mb"},
    )
    assert len(response.content) == TEN_MB
    return Seen(response.status_code, response.content[:16])


async def tls_1_0(env: Env) -> Seen:
    assert env.tls_port is not None and env.certs is not None
    # test_tls.py shows this client can complete a TLS 1.0 handshake with a server that allows it.
    context = ssl.create_default_context()
    env.certs.configure_trust(context)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    tcp = await trio.open_tcp_stream("127.0.0.1", env.tls_port)
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
    with pytest.raises(trio.BrokenResourceError), trio.fail_after(10):
        await stream.do_handshake()
    await tcp.aclose()
    return Seen(0, b"refused")


async def plaintext_on_tls_port(env: Env) -> Seen:
    assert env.tls_port is not None
    tcp = await trio.open_tcp_stream("127.0.0.1", env.tls_port)
    async with tcp:
        await tcp.send_all(_head("GET", "/v1/models"))
        seen = await _read_response(tcp, check_close=False)
    assert not seen.body.startswith(b"HTTP/")
    return seen


# --- The table ------------------------------------------------------------------------------

_MANY = tuple((f"x-h-{i}", "v") for i in range(150))
_BIG = ("x-big", "a" * 40_000)
_CHUNK = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)

CASES = [
    # Bodies the gateway must parse.
    Case("malformed_json", post(b'{"model": '), 400, b"invalid_json"),
    Case("invalid_utf8", post(b'{"model": "\xff\xfe"}'), 400, b"UTF-8"),
    Case("json_not_an_object", post(b"[1, 2]"), 400, b"invalid_json"),
    Case("model_not_a_string", post_json({"model": 5, "messages": []}), 400, b"model_required"),
    Case("messages_not_a_list", post_json({**chat(), "messages": "hi"}), 400, b"invalid_type"),
    Case("stream_not_a_bool", post_json({**chat(), "stream": "yes"}), 400, b"invalid_type"),
    Case(
        "huge_body_declared",
        raw(_head("POST", CHAT, ("content-length", str(4 * BODY_LIMIT))) + b"x" * 65536),
        413,
        b"request_too_large",
    ),
    Case(
        "huge_body_chunked",
        raw(_head("POST", CHAT, ("transfer-encoding", "chunked")) + _CHUNK * 6),
        413,
        b"request_too_large",
    ),
    # Heads: size, count, and what h11 refuses before the app sees anything.
    Case(
        "huge_header_one_write",
        raw(_head("GET", "/v1/models", _BIG), check_close=True),
        431,
        closes=True,
    ),
    Case(
        "many_headers", raw(_head("GET", "/v1/models", *_MANY), check_close=True), 431, closes=True
    ),
    Case(
        "incomplete_head_over_16k",  # h11's h11_max_incomplete_size, answered by Hypercorn
        raw(
            _head("GET", "/v1/models")[:-4] + b"\r\nx-a: " + b"a" * 10_000, b"a" * 10_000, pause=0.1
        ),
        431,
    ),
    Case("cr_in_header_value", raw(_head("GET", "/v1/models", ("x-a", "b\rc"))), 400),
    Case("lf_injected_header_line", raw(_head("GET", "/v1/models", ("x-a", "b\nINJECT"))), 400),
    Case("nul_in_header_value", raw(_head("GET", "/v1/models", ("x-a", "b\x00c"))), 400),
    Case(
        "duplicate_content_length_different",
        raw(body_request(chat(), ("content-length", "3"))),
        400,
    ),
    Case(
        # h11 merges identical repeats into one field (RFC 9110 section 8.6 allows it): the
        # body is framed unambiguously, so the request is served.
        "duplicate_content_length_same",
        raw(
            body_request(
                chat(stream=False), ("content-length", str(len(json.dumps(chat(stream=False)))))
            )
        ),
        200,
        reaches_mock=True,
    ),
    Case(
        "transfer_encoding_and_content_length",
        raw(
            _head("POST", CHAT, ("content-length", "5"), ("transfer-encoding", "chunked"))
            + b"0\r\n\r\n",
            check_close=True,
        ),
        400,
        b"invalid_framing",
        closes=True,
    ),
    Case(
        # The app refuses while h11 still parses the rest: the bytes after the request were
        # an error to h11, and Hypercorn cut the response (or sent none) and logged a
        # BusyResourceError.
        "transfer_encoding_and_content_length_then_more_bytes",
        raw(
            _head("POST", CHAT, ("content-length", "5"), ("transfer-encoding", "chunked"))
            + b"0\r\n\r\n"
            + _head("GET", "/v1/models"),
            check_close=True,
        ),
        400,
        b"Both Content-Length and Transfer-Encoding",
        closes=True,
    ),
    Case(
        # A size no body may reach: answered at once, not after body_timeout (408).
        "chunk_size_2_to_the_64",
        raw(
            _head("POST", CHAT, ("transfer-encoding", "chunked")) + b"10000000000000000\r\nxx",
            check_close=True,
        ),
        413,
        b"request_too_large",
        closes=True,
    ),
    Case(
        # The same on Ollama's route: its error shape, a string under "error".
        "chunk_size_2_to_the_64_ollama",
        raw(
            _head("POST", "/api/chat", ("transfer-encoding", "chunked"))
            + b"10000000000000000\r\nxx",
            check_close=True,
        ),
        413,
        b'{"error": "The request body is larger than',
        closes=True,
    ),
    Case(
        # RFC 9112 section 5.2: a 400, or a space in its place; h11 would join it quietly.
        "obs_fold_header_line",
        raw(_head("GET", "/v1/models", ("x-a", "b\r\n folded")), check_close=True),
        400,
        closes=True,
    ),
    Case(
        "transfer_encoding_gzip",
        raw(_head("POST", CHAT, ("transfer-encoding", "gzip")) + b"0\r\n\r\n"),
        501,
    ),
    Case(
        "bad_chunk_size",
        raw(_head("POST", CHAT, ("transfer-encoding", "chunked")) + b"zz\r\nxx\r\n0\r\n\r\n"),
        400,
    ),
    # Not an open proxy.
    Case(
        "connect_method",
        raw(_head("CONNECT", "169.254.169.254:443"), check_close=True),
        405,
        closes=True,
    ),
    Case("trace_method", raw(_head("TRACE", "/v1/models"), check_close=True), 405, closes=True),
    Case(
        "absolute_form_target",
        raw(_head("GET", "http://169.254.169.254/latest/meta-data/")),
        400,
        b"invalid_target",
    ),
    Case(
        "absolute_form_proxied_path",
        raw(body_request(chat(), target="http://evil.example/v1/chat/completions")),
        400,
        b"invalid_target",
    ),
    Case("dot_dot", raw(_head("GET", "/v1/../ntonix/status")), 400, b"invalid_path"),
    Case("encoded_dot_dot", raw(_head("GET", "/v1/%2e%2e/%2E%2E/etc/passwd")), 400),
    Case("encoded_slash", raw(_head("GET", "/v1/chat%2fcompletions")), 400, b"invalid_path"),
    Case("double_slash", raw(_head("GET", "/v1//169.254.169.254/x")), 400, b"invalid_path"),
    Case("backslash", raw(_head("GET", "/v1/..\\..\\x")), 400, b"invalid_path"),
    Case(
        "leading_double_slash",
        raw(_head("GET", "//evil.example/v1/models")),
        400,
        b"invalid_path",
    ),
    # An encoded separator is refused wherever it stands, with the same message.
    Case("encoded_slash_in_prefix", raw(_head("GET", "/v1%2Fmodels")), 400, b"invalid_path"),
    Case("encoded_slash_in_own_route", raw(_head("GET", "/ntonix%2fstatus")), 400, b"invalid_path"),
    # A known route asked with the wrong method is the gateway's own 405, never forwarded.
    Case("get_on_a_post_route", raw(_head("GET", CHAT)), 405, b"method_not_allowed"),
    Case("delete_on_ollama_chat", raw(_head("DELETE", "/api/chat")), 405, b"POST"),
    Case(
        # `@` is legal in a path; the request still goes only to the configured backend (whose
        # 404 the client gets), never to evil.example.
        "at_sign_in_path",
        raw(_head("GET", "/v1/@evil.example/models")),
        404,
        reaches_mock=True,
    ),
    Case(
        "spoofed_host_header",
        raw(body_request(chat(stream=False), ("x-forwarded-host", "169.254.169.254"))),
        200,
        reaches_mock=True,
    ),
    # Credentials.
    Case("missing_key", raw(_head("GET", "/v1/models", key=False)), 401, b"invalid_api_key"),
    Case(
        "invalid_key",
        raw(_head("GET", "/v1/models", ("authorization", "Bearer k-bad"), key=False)),
        401,
    ),
    Case(
        "key_in_basic_scheme",
        raw(_head("GET", "/v1/models", ("authorization", f"Basic {KEY}"), key=False)),
        401,
    ),
    # TLS front door (more in test_tls.py: TLS 1.1, ChaCha20, ALPN, send timeout).
    Case("tls_1_0", tls_1_0, 0, b"refused", tls=True),
    Case("plaintext_on_tls_port", plaintext_on_tls_port, 0, tls=True),
    # Clients that leave.
    Case("disconnect_during_body", disconnect_during_body, 0),
    Case("disconnect_in_queue", disconnect_in_queue, 0, reaches_mock=True),
    Case("disconnect_before_first_byte", disconnect_before_first_byte, 0, reaches_mock=True),
    Case("disconnect_mid_stream", disconnect_mid_stream, 200, reaches_mock=True),
    Case("endless_stream_cut_by_client", endless_stream_cut_by_client, 200, reaches_mock=True),
    # Backends that fail.
    Case(
        "backend_500",
        post_json(chat(stream=False), headers={"x-mock-status": "500"}),
        500,
        reaches_mock=True,
    ),
    Case(
        "backend_hangs",
        post_json(chat(), headers={"x-mock-hang": "1"}),
        504,
        b"timeout",
        reaches_mock=True,
    ),
    Case(
        "backend_resets_mid_stream",
        post_json(chat(), headers={"x-mock-drop-after": "2"}),
        200,
        b"event: error",
        reaches_mock=True,
    ),
    Case(
        "backend_garbage_sse",  # relayed unchanged: the gateway does not parse a stream
        post_json(
            {"model": "raw", "prompt": "x"},
            path="/v1/completions",
            headers={"x-raw-mode": "garbage-sse"},
        ),
        200,
        b"{broken json",
    ),
    Case("backend_one_10mb_chunk", ten_mb_chunk, 200, b"xxxxxxxx"),
    Case(
        "backend_tls_untrusted",
        post_json({"model": "tls", "prompt": "x"}, path="/v1/completions"),
        502,
        b"certificate verification failed",
    ),
]


# --- Running it -----------------------------------------------------------------------------


def config_text(mock_url: str, raw_url: str, tls_url: str) -> str:
    """The one configuration every case runs under, as `ntonix serve` would read it."""
    return f"""
[gateway]
max_request_body = {BODY_LIMIT}
first_byte_timeout = 3.0  # short for backend_hangs, yet above a loaded CI machine's first byte
retries = 0
queue_timeout = 5.0

[health]
interval = 60.0
timeout = 2.0
failure_threshold = 100000

[cache]
enabled = false

[auth]
api_keys = ["{KEY}"]

[[backends]]
name = "mock"
url = "{mock_url}"
models = ["mock-llm"]
max_concurrent = 1

[[backends]]
name = "raw"
url = "{raw_url}"
models = ["raw"]

[[backends]]
name = "untrusted"
url = "{tls_url}"
models = ["tls"]
"""


@attrs.frozen
class Upstreams:
    mock: MockLLM
    raw: RawUpstream
    config_file: Path


async def start_upstreams(nursery: trio.Nursery, tmp_path: Path) -> Upstreams:
    mock = MockLLM(MockOptions(name="mock", ttft=0.01, token_delay=0.005, tokens=8))
    mock_port = await nursery.start(partial(serve_mock, mock))
    upstream = RawUpstream()
    listeners = await nursery.start(partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1"))
    raw_port = listeners[0].socket.getsockname()[1]
    # A certificate from a CA that nobody configured: the gateway must refuse to talk to it.
    stranger = trustme.CA().issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stranger.configure_cert(context)
    tls_listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, _hold_tls, 0, context, host="127.0.0.1")
    )
    tls_port = tls_listeners[0].transport_listener.socket.getsockname()[1]
    path = tmp_path / "ntonix.toml"
    path.write_text(
        config_text(
            f"http://127.0.0.1:{mock_port}",
            f"http://127.0.0.1:{raw_port}",
            f"https://127.0.0.1:{tls_port}",
        )
    )
    return Upstreams(mock, upstream, path)


async def assert_nothing_leaked(env: Env) -> None:
    """No request in flight at the gateway, no stream open at either backend."""

    async def clean() -> bool:
        snapshot = await status(env.client, env.gateway)
        return (
            snapshot["queued"] == 0
            and all(b["active_requests"] == 0 for b in snapshot["backends"])
            and all(b["pool"]["in_use"] == 0 for b in snapshot["backends"])
            and env.mock.stats()["active"] == 0
            and env.raw.active == 0
        )

    await eventually(clean, timeout=10)


async def run_case(case: Case, env: Env) -> None:
    requests_before = env.mock.stats()["requests"]
    seen = await case.act(env)
    assert seen.status == case.status, (case.name, seen)
    assert case.expect in seen.body, (case.name, seen.body[:500])
    if case.closes:
        assert seen.closed, (case.name, seen)
    if not case.reaches_mock:
        assert env.mock.stats()["requests"] == requests_before, case.name
    await assert_nothing_leaked(env)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_hostile_case(
    case: Case, nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    upstreams = await start_upstreams(nursery, tmp_path)
    config = Config.from_file(upstreams.config_file)
    serve_on = partial(serve, config, shutdown_trigger=trio.sleep_forever)
    urls: list[str] = await nursery.start(partial(serve_on, ["127.0.0.1:0"]))
    tls_port = None
    if case.tls:
        server = ca.issue_cert("127.0.0.1")
        certfile, keyfile = tmp_path / "server.pem", tmp_path / "server.key"
        certfile.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        server.private_key_pem.write_to_path(keyfile)
        tls_urls: list[str] = await nursery.start(
            partial(serve_on, ["127.0.0.1:0"], certfile=str(certfile), keyfile=str(keyfile))
        )
        tls_port = httpx.URL(tls_urls[0]).port
    async with httpx.AsyncClient(timeout=10, headers=dict([AUTH])) as client:
        env = Env(urls[0], client, upstreams.mock, upstreams.raw, tls_port, ca)
        await run_case(case, env)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# A leak of what the table pushes through (10 MB per round at the least) would show at once;
# allocator noise after a warm-up round is a few MB.
RSS_SLACK_KIB = 12 * 1024
ROUNDS = 3


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_the_table_leaves_the_gateway_process_memory_at_its_baseline(
    nursery: trio.Nursery, tmp_path: Path, spawn: Spawn
) -> None:
    upstreams = await start_upstreams(nursery, tmp_path)
    gateway = await spawn(
        PYTHON,
        "-m",
        "ntonix.cli",
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--config",
        str(upstreams.config_file),
    )
    url = (await gateway.wait_for(RUNNING_ON)).group(1).decode()
    cases = [case for case in CASES if not case.tls]
    async with httpx.AsyncClient(timeout=10, headers=dict([AUTH])) as client:
        env = Env(url, client, upstreams.mock, upstreams.raw)
        for case in cases:  # warm-up: imports, pools, allocator arenas
            await run_case(case, env)
        baseline = _rss_kib(gateway.pid)
        for _ in range(ROUNDS):
            for case in cases:
                await run_case(case, env)
        after = _rss_kib(gateway.pid)
    assert after - baseline < RSS_SLACK_KIB, (baseline, after)
