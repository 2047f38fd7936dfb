"""The HTTPS front door under abuse (issue 17): HTTP/2 clients that shut their window, leave
mid-response, reset streams in a loop or flood CONTINUATION frames, and TCP clients that never
start their TLS handshake. Each test is the attack, with a raw `h2` client over TLS.
"""

from __future__ import annotations

import contextlib
import json
import time
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx
import trio
from hyperframe.frame import ContinuationFrame, HeadersFrame

from mocks.llm import MockOptions, serve_mock
from ntonix.protocols import MAX_HEADER_BLOCK, RESET_BUDGET, RESET_WINDOW, STREAM_BUFFER_LIMIT
from ntonix.server import serve
from tests.conftest import RunningMock, StartMock
from tests.support import PYTHON, Spawn, backend, chat, gateway_config, pool_totals, status
from tests.support import wait_until as wait_for
from tests.test_tls import Certs, FloodingMock, _handshake, _port, _start_tls_gateway
from tests.test_tls import certs as certs  # the fixture

CHAT = "/v1/chat/completions"


class H2Attacker:
    """A raw HTTP/2 client over TLS: sends what it is told, reads only when told."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], *, window: int = 65535):
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []

    @classmethod
    async def connect(cls, url: str, certs: Certs, *, window: int = 65535) -> H2Attacker:
        stream = await _handshake(_port(url), certs.client_context("h2"))
        assert stream.selected_alpn_protocol() == "h2"
        attacker = cls(stream, window=window)
        await attacker.flush()
        return attacker

    async def flush(self) -> None:
        if data := self.h2.data_to_send():
            await self.stream.send_all(data)

    def post(self, payload: object) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", CHAT), (":scheme", "https")]
        headers += [(":authority", "localhost"), ("content-type", "application/json")]
        self.h2.send_headers(stream_id, headers)
        self.h2.send_data(stream_id, json.dumps(payload).encode(), end_stream=True)
        return stream_id

    async def read_for(self, seconds: float) -> None:
        """Read (never opening a window) for `seconds`, or until the server closes."""
        with trio.move_on_after(seconds):
            await self.read_until_closed()

    async def read_until_closed(self, *, answer: bool = True) -> None:
        """Read until the server closes; `answer` (SETTINGS and PING acks, say) unless another
        task sends: a reader blocked sending while the server blocks sending would deadlock."""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # reset by the server, or left by this client
            if not data:
                return
            self.events += self.h2.receive_data(data)
            if answer:
                await self.flush()

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        ends = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return ends[0] if ends else None

    async def leave(self) -> None:
        """Drop the connection: a FIN, as a crashed client's kernel sends."""
        self.stream.transport_stream.socket.close()
        await trio.lowlevel.checkpoint()


async def _nothing_in_flight(gateway: str, certs: Certs) -> bool:
    async with httpx.AsyncClient(timeout=5, verify=certs.client_context()) as client:
        snapshot = await status(client, gateway)
    busy = sum(backend["active_requests"] for backend in snapshot["backends"])
    return busy == 0 and pool_totals(snapshot)["in_use"] == 0


async def _eventually_nothing_in_flight(gateway: str, certs: Certs, timeout: float) -> float:
    start = time.monotonic()
    with trio.fail_after(timeout):
        while not await _nothing_in_flight(gateway, certs):
            await trio.sleep(0.05)
    return time.monotonic() - start


# --- 1. A client that leaves while its responses wait for window ----------------------------


async def test_responses_waiting_for_window_end_when_the_client_leaves(
    certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    mock = await start_mock(tokens=20, token_delay=0.001)
    gateway = await _start_tls_gateway(nursery, certs, mock)
    attacker = await H2Attacker.connect(gateway, certs, window=0)
    for _ in range(20):
        attacker.post(chat(stream=False))
    await attacker.flush()
    # Every backend has answered; each response now waits for window the client never opens.
    await wait_for(lambda: mock.stats["completed"] == 20, timeout=10)
    await attacker.read_for(0.3)
    assert not await _nothing_in_flight(gateway, certs)

    await attacker.leave()
    took = await _eventually_nothing_in_flight(gateway, certs, timeout=3)
    assert took < 1.5  # the disconnect, not a timeout, ended them


# --- 2. Zero-window streams: back-pressure, and the send timeout ---------------------------

# What 50 streams may add to the gateway's memory while their clients read nothing: each holds
# at most STREAM_BUFFER_LIMIT queued plus one upstream read (64 KiB) and its parser's buffer,
# about 200 KiB; the rest is allocator slack. Unbounded, the FloodingMock fills this in a second.
ZERO_WINDOW_STREAMS = 50
RSS_BOUND = 24 * 2**20
HTTPS_RUNNING_ON = rb"Running on (https://127\.0\.0\.1:\d+)"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _spawn_tls_serve(
    spawn: Spawn, tmp_path: Path, certs: Certs, backend_url: str
) -> tuple[int, str]:
    config = tmp_path / "ntonix.toml"
    config.write_text(
        f'[cache]\nenabled = false\n[[backends]]\nname = "m"\nurl = "{backend_url}"\n'
    )
    gateway = await spawn(
        *[PYTHON, "-m", "ntonix.cli", "serve", "--bind", "127.0.0.1:0", "--config", str(config)],
        *["--certfile", str(certs.certfile), "--keyfile", str(certs.keyfile)],
    )
    return gateway.pid, (await gateway.wait_for(HTTPS_RUNNING_ON)).group(1).decode()


async def test_memory_with_50_zero_window_streams_stays_bounded(
    certs: Certs, tmp_path: Path, spawn: Spawn, nursery: trio.Nursery
) -> None:
    assert 50 * (STREAM_BUFFER_LIMIT + 3 * 65536) < RSS_BOUND
    mock = FloodingMock(MockOptions(tokens=500, token_delay=0.001, ttft=0))
    mock_port = await nursery.start(serve_mock, mock)
    pid, gateway = await _spawn_tls_serve(spawn, tmp_path, certs, f"http://127.0.0.1:{mock_port}")
    assert await _nothing_in_flight(gateway, certs)  # and the code paths are loaded
    baseline = _rss(pid)

    attacker = await H2Attacker.connect(gateway, certs, window=0)
    for _ in range(ZERO_WINDOW_STREAMS):
        attacker.post(chat())
    await attacker.flush()
    nursery.start_soon(attacker.read_until_closed)
    await wait_for(lambda: mock.stats()["active"] == ZERO_WINDOW_STREAMS, timeout=10)
    peak = 0
    for _ in range(30):  # 3 s: unbounded, the flood passes the bound within the first second
        peak = max(peak, _rss(pid) - baseline)
        assert peak < RSS_BOUND, f"+{peak / 2**20:.1f} MiB with {ZERO_WINDOW_STREAMS} streams"
        await trio.sleep(0.1)
    # Back-pressure reached the backend: it is blocked writing, not generating on.
    assert mock.stats()["completed"] == 0

    await attacker.leave()
    await _eventually_nothing_in_flight(gateway, certs, timeout=3)
    await wait_for(lambda: mock.stats()["active"] == 0, timeout=3)


async def test_a_stream_left_without_window_past_the_send_timeout_is_reset(
    certs: Certs, nursery: trio.Nursery
) -> None:
    mock = FloodingMock(MockOptions(tokens=500, token_delay=0.001, ttft=0))
    mock_port = await nursery.start(serve_mock, mock)
    gateway = await _start_tls_gateway(
        nursery, certs, RunningMock(mock, f"http://127.0.0.1:{mock_port}"), send_timeout=0.5
    )
    attacker = await H2Attacker.connect(gateway, certs, window=0)
    stream_id = attacker.post(chat())
    await attacker.flush()
    started = time.monotonic()
    with trio.move_on_after(5):
        while not any(isinstance(e, h2.events.StreamReset) for e in attacker.events):
            await attacker.read_for(0.05)
    took = time.monotonic() - started
    (reset,) = [e for e in attacker.events if isinstance(e, h2.events.StreamReset)]
    assert reset.stream_id == stream_id and reset.error_code == h2.errors.ErrorCodes.CANCEL
    assert 0.5 <= took < 3
    await wait_for(lambda: mock.stats()["client_disconnects"] == 1, timeout=2)
    assert await _nothing_in_flight(gateway, certs)
    await attacker.stream.aclose()


# --- 3. Silent connections: the handshake timeout and the connections per client -----------


async def _serve_tls(
    nursery: trio.Nursery, certs: Certs, mock: RunningMock, **gateway: float
) -> str:
    config = gateway_config(backend(mock.url, "m"), **gateway)
    run = partial(
        serve,
        config,
        ["127.0.0.1:0"],
        certfile=str(certs.certfile),
        keyfile=str(certs.keyfile),
        shutdown_trigger=trio.sleep_forever,
    )
    urls: list[str] = await nursery.start(run)
    return urls[0]


async def _closed_after(stream: trio.SocketStream, timeout: float) -> float:
    """How long until the gateway closes (or resets) a connection that sends nothing."""
    start = time.monotonic()
    with trio.fail_after(timeout):
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
    return time.monotonic() - start


async def test_a_silent_connection_to_the_tls_port_is_closed_within_the_handshake_timeout(
    certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    gateway = await _serve_tls(nursery, certs, await start_mock(), handshake_timeout=0.5)
    async with await trio.open_tcp_stream("127.0.0.1", _port(gateway)) as silent:
        took = await _closed_after(silent, timeout=5)
    assert 0.4 <= took < 2


async def test_one_client_address_cannot_take_every_connection_slot(
    certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    gateway = await _serve_tls(
        nursery, certs, await start_mock(), max_connections_per_client=3, handshake_timeout=30
    )
    port = _port(gateway)
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
    # Past its limit, the address's next connection is reset at once, before any TLS...
    assert await _refused_at_once(port)
    # ...while another client address is served (127.0.0.2 is loopback too, on Linux).
    other = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
    tls = trio.SSLStream(other, certs.client_context(), server_hostname="127.0.0.1")
    with trio.fail_after(5):
        await tls.do_handshake()
    await tls.aclose()
    # A slot the address frees is its own again.
    await held.pop().aclose()
    await wait_for_handshake(port, certs)
    for stream in held:
        await stream.aclose()


async def _refused_at_once(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True  # the reset came before connect() returned
    async with stream:
        return await _closed_after(stream, timeout=2) < 1


async def wait_for_handshake(port: int, certs: Certs) -> None:
    """A TLS handshake from 127.0.0.1 succeeds, once the freed slot is seen to be free."""
    with trio.fail_after(5):
        while True:
            try:
                stream = await _handshake(port, certs.client_context())
            except trio.BrokenResourceError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return


# --- 4. Delayed rapid reset ----------------------------------------------------------------

ATTACK_CONNECTIONS = 2
STREAMS_PER_ROUND = 100  # Hypercorn's SETTINGS_MAX_CONCURRENT_STREAMS


async def _reset_loop(
    gateway: str, certs: Certs, stop: trio.Event, goaways: list[h2.events.ConnectionTerminated]
) -> None:
    """Open 100 streams, reset them 50 ms later, again and again, reading all the while (a
    client that stops reading would only stall its own connection); reconnect when closed."""
    while not stop.is_set():
        try:
            attacker = await H2Attacker.connect(gateway, certs)
        except (trio.BrokenResourceError, OSError):
            continue
        async with trio.open_nursery() as connection:
            connection.start_soon(partial(attacker.read_until_closed, answer=False))
            try:
                while not stop.is_set() and attacker.goaway() is None:
                    ids = [attacker.post(chat()) for _ in range(STREAMS_PER_ROUND)]
                    await attacker.flush()
                    await trio.sleep(0.05)
                    for stream_id in ids:
                        attacker.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                    await attacker.flush()
            except (trio.BrokenResourceError, h2.exceptions.ProtocolError):
                pass  # closed under the client's feet; ProtocolError: h2 refuses after GOAWAY
            with trio.move_on_after(1):  # the GOAWAY may still be on its way
                while attacker.goaway() is None:
                    await trio.sleep(0.01)
            connection.cancel_scope.cancel()
        if (goaway := attacker.goaway()) is not None:
            goaways.append(goaway)
        await attacker.stream.aclose()


async def test_a_reset_flood_is_closed_with_enhance_your_calm_and_bounds_generations(
    certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    mock = await start_mock(ttft=10, tokens=1)  # counted on arrival; no CPU spent after
    gateway = await _start_tls_gateway(nursery, certs, mock)
    goaways: list[h2.events.ConnectionTerminated] = []
    stop = trio.Event()
    started = trio.current_time()
    async with trio.open_nursery() as attack:
        for _ in range(ATTACK_CONNECTIONS):
            attack.start_soon(_reset_loop, gateway, certs, stop, goaways)
        # Unbounded, no connection is ever closed (Hypercorn's limit is 1,000 requests).
        await wait_for(lambda: len(goaways) >= ATTACK_CONNECTIONS, timeout=8)
        await trio.sleep(1)  # the attackers reconnect and try again meanwhile
        stop.set()
    assert trio.current_time() - started < RESET_WINDOW  # the bound below is for one window

    assert goaways, "no connection was ever closed"
    assert all(g.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM for g in goaways)
    # Each connection gets one round of streams (at most 100 at once) before the resets put
    # the address over budget, and the round of one more connection fits in the budget;
    # later connections and streams from the address are refused before any request starts,
    # until the budget has drained (RESET_WINDOW).
    generations = mock.stats["requests"]
    assert generations <= ATTACK_CONNECTIONS * STREAMS_PER_ROUND + RESET_BUDGET
    await _eventually_nothing_in_flight(gateway, certs, timeout=5)


# --- 5. CONTINUATION flood -----------------------------------------------------------------


async def test_a_header_block_past_the_cap_is_refused_with_enhance_your_calm(
    certs: Certs, start_mock: StartMock, nursery: trio.Nursery
) -> None:
    gateway = await _start_tls_gateway(nursery, certs, await start_mock())
    attacker = await H2Attacker.connect(gateway, certs)
    # A HEADERS frame without END_HEADERS, then CONTINUATION frames that never end the block:
    # without a cap, h2 holds up to 64 of them (1 MiB) per connection.
    fragment = b"\x00" * 16_384
    frames = [HeadersFrame(1, data=fragment)]
    frames += [ContinuationFrame(1, data=fragment) for _ in range(MAX_HEADER_BLOCK // 16_384)]
    await attacker.stream.send_all(attacker.h2.data_to_send())
    with contextlib.suppress(trio.BrokenResourceError):
        for frame in frames:
            await attacker.stream.send_all(frame.serialize())
    with trio.fail_after(5):
        await attacker.read_until_closed()
    goaway = attacker.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert await _nothing_in_flight(gateway, certs)
