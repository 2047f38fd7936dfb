"""The data-plane client: HTTP/1.1 over Trio streams (`http1`: llhttp), one keep-alive pool per
backend.

Why not httpx's pool here: on this machine it served ~4x fewer requests per second and leaked
pool slots when requests were cancelled while waiting (docs/BENCHMARKS.md). Why HTTP/1.1: closing
the connection is the one cancel signal every LLM server understands, so a cancelled request
closes its socket at once and the backend stops generating.

This is the one place where socket, TLS and HTTP/1.1 errors become `GatewayError`s, and where any
failed connection (the probers' too) is put in plain words: "connection refused by
127.0.0.1:11434", never the text of the exception groups that Trio raises for a connect.
Callers own the timeouts (`trio.fail_after` around each phase); nothing here waits on a clock.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
from typing import cast

import attrs
import trio

from ntonix.config import BackendSettings
from ntonix.errors import GatewayError, upstream_error
from ntonix.http1 import RequestError, ResponseError, ResponseReader, request_head
from ntonix.plain_socket import read_when_readable, write_now

RECEIVE_SIZE = 65536
# A response head larger than this is a broken or hostile backend, not an LLM server.
MAX_RESPONSE_HEAD = 64 * 1024
# Idle keep-alive connections kept per backend; more are closed when they come back.
MAX_IDLE_PER_BACKEND = 512


BackendStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]

# What a socket, TLS or HTTP/1.1 failure can raise; translated in one place, below.
_FOREIGN_ERRORS = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    ResponseError,
    RequestError,
)


def _gateway_error(
    error: BaseException, backend: BackendSettings, doing: str, closed_by_backend: bool = False
) -> GatewayError:
    if isinstance(error, ResponseError | RequestError) and not closed_by_backend:
        return upstream_error(
            502,
            "backend_protocol_error",
            f"Backend {backend.name} sent an invalid HTTP response while {doing}: {error}",
        )
    if closed_by_backend:
        return upstream_error(
            502,
            "backend_connection_broken",
            f"Backend {backend.name} closed the connection while {doing}",
        )
    return upstream_error(
        502,
        "backend_unreachable" if doing == "connecting" else "backend_connection_broken",
        f"Backend {backend.name} failed while {doing}: {describe_failure(error, backend)}",
    )


# The gateway's own limits, not the backend's fault: descriptors (per process, system-wide),
# socket buffers, memory.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def out_of_resources(error: BaseException) -> OSError | None:
    """The OSError saying the gateway ran out of descriptors or memory, among the root causes
    of `error` (say, one of the attempts trio's `open_tcp_stream` groups behind its OSError)."""
    for cause in _root_causes(error):
        if isinstance(cause, OSError) and cause.errno in _EXHAUSTED:
            return cause
    return None


def describe_failure(error: BaseException, backend: BackendSettings) -> str:
    """What went wrong with a connection to `backend`, in plain words: "connection refused by
    127.0.0.1:11434". Each distinct root cause once (a host name may have several addresses)."""
    host = f"[{backend.host}]" if ":" in backend.host else backend.host
    address = f"{host}:{backend.port}"
    words = (_in_words(cause, backend.host, address) for cause in _root_causes(error))
    return "; ".join(dict.fromkeys(words))


def _root_causes(error: BaseException) -> list[BaseException]:
    """The errors at the bottom of `error`'s chain: Trio raises an OSError from an exception
    group of one error per address tried; httpx wraps httpcore's error, which holds the
    original as its argument."""
    if isinstance(error, BaseExceptionGroup):
        return [cause for inner in error.exceptions for cause in _root_causes(inner)]
    inner = error.__cause__
    if inner is None and error.args and isinstance(error.args[0], BaseException):
        inner = error.args[0]
    return [error] if inner is None else _root_causes(inner)


_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused by {}",
    errno.ECONNRESET: "connection reset by {}",
    errno.ECONNABORTED: "connection aborted by {}",
    errno.EPIPE: "connection closed by {}",
    errno.EHOSTUNREACH: "no route to host {}",
    errno.ENETUNREACH: "network unreachable for {}",
    errno.ETIMEDOUT: "connection to {} timed out",
}


def _in_words(error: BaseException, host: str, address: str) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({error.verify_message})"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake with {address} failed ({error.reason or error})"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve {host} ({error.strerror})"
    if isinstance(error, OSError) and error.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[error.errno].format(address)
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror.lower()} ({address})"
    if isinstance(error, trio.BrokenResourceError | trio.ClosedResourceError):
        return f"connection to {address} broken"
    return str(error) or type(error).__name__


@attrs.frozen
class Response:
    """A backend's response head: status and headers (names lowercased)."""

    status_code: int
    headers: list[tuple[bytes, bytes]]


class UpstreamConnection:
    """One HTTP/1.1 connection to a backend; used by one request at a time."""

    __slots__ = ("_backend", "_plain", "_reader", "_socket", "_stream", "closed_by_backend")

    def __init__(
        self, backend: BackendSettings, socket_stream: trio.SocketStream, stream: trio.abc.Stream
    ) -> None:
        self._backend = backend
        self._socket = socket_stream.socket
        self._stream = stream
        # No TLS: bytes go to and come from the socket itself (see `send_request`, `_receive`).
        self._plain = stream is socket_stream
        self._reader: ResponseReader | None = None  # of the exchange under way
        self.closed_by_backend = False

    async def send_request(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """Write the request. On a plain socket a request the kernel takes whole is written
        without a schedule point (Trio's `send_all` has one): the response's wait has one."""
        self._reader = ResponseReader(max_head=MAX_RESPONSE_HEAD, head_request=method == b"HEAD")
        request = request_head(method, target, headers) + body
        try:
            sent = write_now(self._socket, request) if self._plain else 0
            if sent < len(request):
                await self._stream.send_all(memoryview(request)[sent:])
        except _FOREIGN_ERRORS as error:
            raise await self._failed(error, "sending the request") from error

    async def receive_response(self) -> Response:
        """The response head; interim 1xx responses are skipped."""
        reader = self._reader
        assert reader is not None, "send_request first"
        try:
            while not reader.status:
                await self._receive(reader)
        except _FOREIGN_ERRORS as error:
            raise await self._failed(error, "waiting for the response") from error
        return Response(reader.status, reader.headers)

    async def receive_body(self) -> tuple[bytes, bool]:
        """Body bytes that have arrived (at least one byte unless the body ended), and whether
        the body is complete. Chunks that arrived together are joined: fewer writes, no delay."""
        reader = self._reader
        assert reader is not None, "send_request first"
        try:
            while (arrived := reader.take()) is None:
                await self._receive(reader)
        except _FOREIGN_ERRORS as error:
            raise await self._failed(error, "streaming the response") from error
        return arrived

    def body_complete(self) -> bool:
        """The whole body of the response under way has arrived: `receive_body` will not wait."""
        return self._reader is not None and self._reader.complete

    async def _failed(self, error: BaseException, doing: str) -> GatewayError:
        # A client that leaves cancels its request and closes this socket at once (`close`).
        # A read that completed in the same scheduler batch then fails on the closed socket
        # before reaching a checkpoint: that is the client's leaving, not the backend failing,
        # so the cancellation ends the request (no failure charged to the backend, no error
        # frame, the access log says client_disconnected).
        await trio.lowlevel.checkpoint_if_cancelled()
        return _gateway_error(error, self._backend, doing, self.closed_by_backend)

    async def _receive(self, reader: ResponseReader) -> None:
        if self._plain:
            data = await read_when_readable(self._socket, RECEIVE_SIZE)
        else:
            # Trio's TLS stream returns bytes; the ABC also allows bytearray.
            data = cast(bytes, await self._stream.receive_some(RECEIVE_SIZE))
        if not data:
            self.closed_by_backend = True
        reader.feed(data)

    def ready_for_reuse(self) -> bool:
        """True, and ready for the next request, if the last exchange completed cleanly."""
        reader, self._reader = self._reader, None
        if reader is None:
            return False
        reader.close()
        return reader.reusable() and not reader.body

    def is_stale(self) -> bool:
        # An idle HTTP/1.1 connection has nothing to read: readable means EOF or junk.
        return self._socket.is_readable()

    def close(self) -> None:
        """Close now, synchronously: safe in any cleanup, and the backend sees it at once."""
        self._socket.close()


@attrs.frozen
class PoolStatistics:
    idle: int
    in_use: int
    opened: int
    closed: int
    reused: int


class BackendPool:
    """Keep-alive connections to one backend."""

    def __init__(self, backend: BackendSettings, ssl_context: ssl.SSLContext | None) -> None:
        self.backend = backend
        self._ssl_context = ssl_context
        self._family = _address_family(backend.host)
        self._idle: list[UpstreamConnection] = []
        self._retired = False
        self._in_use = 0
        self._opened = 0
        self._closed = 0
        self._reused = 0

    def checkout_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection that is still open, if any (no waiting)."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.is_stale():
                self._discard(connection)
                continue
            self._reused += 1
            self._in_use += 1
            return connection
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection, counted as in use."""
        connection = await self._connect()
        self._opened += 1
        self._in_use += 1
        return connection

    def checkin(self, connection: UpstreamConnection) -> None:
        """Give a connection back: kept if its exchange completed, closed otherwise."""
        self._in_use -= 1
        if (
            connection.ready_for_reuse()
            and not self._retired
            and len(self._idle) < MAX_IDLE_PER_BACKEND
        ):
            self._idle.append(connection)
        else:
            self._discard(connection)

    def retire(self) -> None:
        """Close the idle connections now and those in use when they come back."""
        self._retired = True
        while self._idle:
            self._discard(self._idle.pop())

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            idle=len(self._idle),
            in_use=self._in_use,
            opened=self._opened,
            closed=self._closed,
            reused=self._reused,
        )

    def _discard(self, connection: UpstreamConnection) -> None:
        connection.close()
        self._closed += 1

    async def open_stream(self) -> BackendStream:
        """A new connection of its own (TLS done), outside the pool's keep-alive accounting:
        a WebSocket session holds its connection until the session ends."""
        return (await self._open())[1]

    async def _connect(self) -> UpstreamConnection:
        socket_stream, stream = await self._open()
        return UpstreamConnection(self.backend, socket_stream, stream)

    async def _open(self) -> tuple[trio.SocketStream, BackendStream]:
        backend = self.backend
        try:
            if self._family is None:
                socket_stream = await trio.open_tcp_stream(backend.host, backend.port)
            else:
                socket_stream = await _connect_to_address(self._family, backend.host, backend.port)
        except _FOREIGN_ERRORS as error:
            exhausted = out_of_resources(error)
            if exhausted is not None:
                raise GatewayError(
                    503,
                    "gateway_out_of_resources",
                    f"The gateway cannot open a connection to backend {backend.name}: {exhausted}",
                    source="gateway",
                    retry_after=1,
                ) from error
            raise _gateway_error(error, backend, "connecting") from error
        if self._ssl_context is None:
            return socket_stream, socket_stream
        try:
            tls = trio.SSLStream(socket_stream, self._ssl_context, server_hostname=backend.host)
            await tls.do_handshake()
        except BaseException as error:
            socket_stream.socket.close()
            if isinstance(error, _FOREIGN_ERRORS):
                raise _gateway_error(error, backend, "connecting") from error
            raise
        return socket_stream, tls


def _address_family(host: str) -> socket.AddressFamily | None:
    """The family of a numeric address; None for a name, which must be resolved."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


async def _connect_to_address(
    family: socket.AddressFamily, host: str, port: int
) -> trio.SocketStream:
    """A numeric address has one candidate: connect straight to it, without the resolver
    thread and the nursery of tasks that `open_tcp_stream` runs to race several addresses."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def backend_ssl_context(backend: BackendSettings) -> ssl.SSLContext | None:
    """TLS settings for an https backend: system CAs plus its `ca_file`, optional client cert."""
    if backend.scheme != "https":
        return None
    context = ssl.create_default_context(cafile=backend.ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if backend.client_cert:
        context.load_cert_chain(backend.client_cert, backend.client_key or None)
    if not backend.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
