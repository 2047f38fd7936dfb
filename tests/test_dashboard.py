"""The live dashboard: the page, its websocket feed, and what a browser shows (issue 6).

The page is one self-contained HTML file behind the admin token; the websocket sends a
snapshot every second and leaves nothing behind when its client goes; in headless Chromium a
killed backend's row turns "open" within 3 s. The browser test saves its screenshot to
test-artifacts/dashboard.png at the repository root.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from ntonix import dashboard
from ntonix.config import AuthSettings, Config, HealthSettings
from tests.browser import find_chromium, headless_chromium
from tests.conftest import StartGatewayWith, StartMock
from tests.support import (
    REPO_ROOT,
    RawClient,
    Spawn,
    backend,
    chat,
    closed_port_url,
    gateway_config,
    spawn_mock,
    spawn_serve,
)

TOKEN = "dashboard-secret"
PAGE = "/ntonix/dashboard"
FEED = "/ntonix/dashboard/ws"
SCREENSHOT = REPO_ROOT / "test-artifacts" / "dashboard.png"

STATUS_KEYS = {
    "version", "workers", "cache", "shared_tier", "uptime_seconds", "strategy", "queued",
    "backends",
}  # fmt: skip
BACKEND_KEYS = {
    "name", "url", "weight", "state", "consecutive_failures", "active_requests", "latency_ms",
    "last_error", "models", "probe", "draining", "not_eligible_because", "pool", "ttft_p50_ms",
}  # fmt: skip
RATES_KEYS = {
    "window_seconds", "requests_per_second", "ttft_p50_ms", "ttft_p99_ms", "cache_hit_ratio",
    "backend_requests_saved", "active_requests",
}  # fmt: skip
SERIES_KEYS = {"t", "requests", "ttft_p50_ms", "ttft_p99_ms"}


def with_admin_token(config: Config) -> Config:
    return attrs.evolve(config, auth=AuthSettings(admin_token=TOKEN))


def feed_url(gateway: str, query: str = "") -> str:
    return gateway.replace("http://", "ws://", 1) + FEED + query


async def feed_is_refused(url: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bool:
    """Whether the gateway turns the websocket away before sending it anything."""
    try:
        async with open_websocket_url(url, extra_headers=list(headers)) as socket:
            await socket.get_message()
    except (ConnectionRejected, ConnectionClosed):
        return True
    return False


# --- stream_snapshots alone, driven as Hypercorn would drive it -----------------------------


@attrs.define
class FakeWebsocket:
    """The ASGI side of one websocket: what the app receives, and what it sent when."""

    incoming: trio.MemorySendChannel[dict[str, Any]]
    receive_channel: trio.MemoryReceiveChannel[dict[str, Any]]
    sent: list[tuple[float, dict[str, Any]]] = attrs.Factory(list)
    broken: bool = False

    @classmethod
    def open(cls) -> FakeWebsocket:
        incoming, receive_channel = trio.open_memory_channel[dict[str, Any]](10)
        return cls(incoming, receive_channel)

    async def receive(self) -> dict[str, Any]:
        return await self.receive_channel.receive()

    async def send(self, message: dict[str, Any]) -> None:
        if self.broken:
            raise OSError("connection gone")  # how the ASGI spec says a server reports it
        self.sent.append((trio.current_time(), message))


def counting_snapshot() -> Callable[[], Awaitable[dict[str, object]]]:
    calls = 0

    async def snapshot() -> dict[str, object]:
        nonlocal calls
        calls += 1
        return {"n": calls}

    return snapshot


@contextlib.asynccontextmanager
async def feeding(
    socket: FakeWebsocket, *, interval: float, stopping: trio.Event | None = None
) -> AsyncIterator[None]:
    """stream_snapshots serving `socket` (connected) while the with-block runs; the block must
    make it return. Virtual seconds: a feed that never ends fails the test, not hangs it."""
    await socket.incoming.send({"type": "websocket.connect"})
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                dashboard.stream_snapshots,
                socket.receive,
                socket.send,
                counting_snapshot(),
                trio.Event() if stopping is None else stopping,
                interval,
            )
            yield


async def test_stream_snapshots_sends_one_at_once_then_one_per_interval_until_disconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    socket = FakeWebsocket.open()
    async with feeding(socket, interval=2.0):
        await trio.sleep(5.0)
        await socket.incoming.send({"type": "websocket.receive", "text": "ignored"})
        await trio.sleep(0.5)
        await socket.incoming.send({"type": "websocket.disconnect", "code": 1006})
    # The block is done: stream_snapshots returned, and with it every task it started.
    assert socket.sent[0] == (0.0, {"type": "websocket.accept"})
    snapshots = socket.sent[1:]
    assert [at for at, _ in snapshots] == [0.0, 2.0, 4.0]
    assert [json.loads(m["text"]) for _, m in snapshots] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert trio.current_time() == 5.5  # returned as soon as the disconnect arrived


async def test_stream_snapshots_returns_when_sending_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    socket = FakeWebsocket.open()
    async with feeding(socket, interval=1.0):
        await trio.sleep(1.5)
        socket.broken = True
    assert len(socket.sent) == 3  # accept, then the snapshots at 0 s and 1 s
    assert trio.current_time() == 2.0


async def test_stream_snapshots_never_accepts_a_client_gone_before_the_handshake() -> None:
    socket = FakeWebsocket.open()
    await socket.incoming.send({"type": "websocket.disconnect", "code": 1006})
    with trio.fail_after(1):
        await dashboard.stream_snapshots(
            socket.receive, socket.send, counting_snapshot(), trio.Event()
        )
    assert socket.sent == []


async def test_stream_snapshots_closes_going_away_when_the_server_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    socket = FakeWebsocket.open()
    stopping = trio.Event()
    async with feeding(socket, interval=1.0, stopping=stopping):
        await trio.sleep(1.5)
        stopping.set()
    assert [m["type"] for _, m in socket.sent] == [
        "websocket.accept",
        "websocket.send",
        "websocket.send",
        "websocket.close",
    ]
    assert socket.sent[-1] == (1.5, {"type": "websocket.close", "code": 1001})
    # A page that reconnects while the server drains is turned away at once.
    late = FakeWebsocket.open()
    await late.incoming.send({"type": "websocket.connect"})
    await dashboard.stream_snapshots(late.receive, late.send, counting_snapshot(), stopping)
    assert [m for _, m in late.sent] == [{"type": "websocket.close", "code": 1001}]


def test_the_page_ships_inside_the_package() -> None:
    assert dashboard.page() is dashboard.page()  # read once
    assert dashboard.page().startswith(b"<!doctype html>")


# --- the page over HTTP ---------------------------------------------------------------------


async def test_the_page_is_one_self_contained_html_file(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock("a")
    gateway = await start_gateway_with(gateway_config(backend(mock.url, "a")))
    response = await client.get(gateway + PAGE)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert response.content == dashboard.page()
    # Nothing is fetched from anywhere: the only URL is the SVG namespace, a name, not a load.
    assert set(re.findall(r"https?://[^\s\"'<>)]*", html)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(link|img|iframe)\b|<script[^>]*\bsrc=|@import", html, re.I)
    assert not re.search(r"\burl\(", html)  # CSS loading an image or a font
    assert "innerHTML" not in html  # data is rendered as text, never parsed as markup


async def test_with_an_admin_token_the_page_needs_it_as_query_parameter_or_cookie(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock("a")
    gateway = await start_gateway_with(with_admin_token(gateway_config(backend(mock.url, "a"))))

    refused = await client.get(gateway + PAGE)
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["code"] == "invalid_admin_token"
    assert (await client.get(f"{gateway}{PAGE}?token=wrong")).status_code == 401
    wrong_cookie = {"cookie": "ntonix_admin_token=wrong"}
    assert (await client.get(gateway + PAGE, headers=wrong_cookie)).status_code == 401

    assert (await client.get(f"{gateway}{PAGE}?token={TOKEN}")).status_code == 200
    cookie = {"cookie": f"theme=dark; ntonix_admin_token={TOKEN}"}
    assert (await client.get(gateway + PAGE, headers=cookie)).status_code == 200


# --- the websocket feed ---------------------------------------------------------------------


async def test_the_feed_sends_a_full_snapshot_about_every_second(
    start_mock: StartMock, start_gateway_with: StartGatewayWith, client: httpx.AsyncClient
) -> None:
    mock = await start_mock("a")
    gateway = await start_gateway_with(gateway_config(backend(mock.url, "a")))
    for index in range(3):  # some traffic, so that the rates and the series have numbers
        answer = await client.post(f"{gateway}/v1/chat/completions", json=chat(f"q{index}"))
        assert answer.status_code == 200

    with trio.fail_after(10):
        async with open_websocket_url(feed_url(gateway)) as socket:
            first = json.loads(await socket.get_message())
            first_at = time.monotonic()
            second = json.loads(await socket.get_message())
            gap = time.monotonic() - first_at

    assert 0.5 < gap < 2.0, gap
    for snapshot in (first, second):
        assert snapshot.keys() >= STATUS_KEYS | {"rates", "series"}
        assert snapshot["backends"] and snapshot["backends"][0].keys() >= BACKEND_KEYS
        assert snapshot["rates"].keys() >= RATES_KEYS
        assert snapshot["series"], "three requests in the last minute"
        assert all(point.keys() >= SERIES_KEYS for point in snapshot["series"])
    # The rate counts whole seconds gone by: the second snapshot comes a second later.
    assert second["rates"]["requests_per_second"] > 0
    assert sum(point["requests"] for point in first["series"]) == 3
    assert first["backends"][0]["ttft_p50_ms"] is not None
    assert second["uptime_seconds"] > first["uptime_seconds"]
    # The per-key token table: no keys configured, so every client is "anonymous".
    (tokens,) = first["usage"]
    assert tokens["key"] == "anonymous" and tokens["completion"] == 3 * 8
    assert tokens["minute"] == tokens["today"] == tokens["prompt"] + tokens["completion"]


async def test_with_an_admin_token_the_feed_needs_it_as_query_parameter_or_cookie(
    start_mock: StartMock, start_gateway_with: StartGatewayWith
) -> None:
    mock = await start_mock("a")
    gateway = await start_gateway_with(with_admin_token(gateway_config(backend(mock.url, "a"))))
    with trio.fail_after(20):
        assert await feed_is_refused(feed_url(gateway))
        assert await feed_is_refused(feed_url(gateway, "?token=wrong"))
        assert await feed_is_refused(feed_url(gateway), [(b"cookie", b"ntonix_admin_token=no")])

        assert not await feed_is_refused(feed_url(gateway, f"?token={TOKEN}"))
        cookie = (b"cookie", f"ntonix_admin_token={TOKEN}".encode())
        assert not await feed_is_refused(feed_url(gateway), [cookie])


def running_tasks() -> Counter[str]:
    """The names of every task in this test's Trio run (the gateway's included), counted."""
    names: Counter[str] = Counter()

    def count(task: trio.lowlevel.Task) -> None:
        names[task.name] += 1
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                count(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    count(root)
    return names


async def test_clients_that_leave_leave_no_task_behind(
    start_gateway_with: StartGatewayWith,
) -> None:
    # No live backend: a kept-alive probe connection would hold tasks of its own for a while.
    gateway = await start_gateway_with(gateway_config(backend(closed_port_url(), "a")))
    # Hypercorn reports its port before its listener tasks are running: let them start.
    await trio.testing.wait_all_tasks_blocked(0.05)
    baseline = running_tasks()

    with trio.fail_after(10):
        # Three that close politely and one that just drops the TCP connection.
        async with (
            open_websocket_url(feed_url(gateway)) as first,
            open_websocket_url(feed_url(gateway)) as second,
            open_websocket_url(feed_url(gateway)) as third,
        ):
            for socket in (first, second, third):
                await socket.get_message()
            connected = running_tasks() - baseline
        dropped = await RawClient.connect(gateway)
        await dropped.send_request(
            "GET",
            FEED,
            headers={
                "upgrade": "websocket",
                "connection": "Upgrade",
                "sec-websocket-key": "ZGFzaGJvYXJkIHRlc3Qga2V5",
                "sec-websocket-version": "13",
            },
        )
        await dropped.read_until(b"\r\n\r\n")
        assert dropped.received.startswith(b"HTTP/1.1 101")
        await dropped.read_until(b'"backends"')  # the first snapshot is on its way
        await dropped.hang_up()

    assert connected.total() > 3, connected  # their connections had tasks of their own
    # Hypercorn's connection tasks and ours are gone a moment later.
    started = time.monotonic()
    with trio.move_on_after(10):
        while left_behind := running_tasks() - baseline:
            await trio.sleep(0.002)
    assert not left_behind, left_behind
    print(f"no task left behind {time.monotonic() - started:.3f} s after the last client left")


# --- in a real browser ----------------------------------------------------------------------

# Probes every 0.2 s, a circuit opens after 2 failures and stays open for the whole test.
DASHBOARD_HEALTH = HealthSettings(
    interval=0.2, timeout=0.5, failure_threshold=2, open_for=60, max_open_for=120
)
# Each mock reports its queue as vLLM does, so the rows show the engines' load too.
QUICK_MOCK = ("--tokens", "6", "--token-delay", "0.002", "--engine", "vllm", "--slots", "4")
BADGE = "document.getElementById('connection').textContent"
ROW_TEXT = "document.querySelector('tr[data-backend=\"{name}\"]')?.textContent ?? ''"
STATE_CHANGE_BOUND = 3.0  # seconds from the kill to the row turning "open" (issue 6)


CHROMIUM = find_chromium()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium, chromium-browser or google-chrome on PATH: `nox -s tests` installs "
    "Debian's chromium package (or run `apt-get install chromium`)",
)
async def test_a_killed_backend_turns_open_in_the_browser_within_3_s(
    start_gateway_with: StartGatewayWith, spawn: Spawn, client: httpx.AsyncClient
) -> None:
    """Three mock backends in headless Chromium; one is SIGKILLed. The screenshot is saved to
    test-artifacts/dashboard.png at the repository root."""
    assert CHROMIUM is not None
    mocks = [
        await spawn_mock(spawn, name, *QUICK_MOCK, "--ttft", ttft)
        for name, ttft in (("alpha", "0.02"), ("beta", "0.04"), ("gamma", "0.06"))
    ]
    config = gateway_config(
        *(backend(m.url, name) for m, name in zip(mocks, ("alpha", "beta", "gamma"), strict=True)),
        health=DASHBOARD_HEALTH,
    )
    gateway = await start_gateway_with(with_admin_token(config))

    async def traffic() -> None:  # so that the numbers and the charts have something to show
        for index in range(100_000):
            body = chat(f"q{index}", stream=index % 2 == 0)
            with contextlib.suppress(httpx.HTTPError):  # the kill may cut one; no matter here
                await client.post(f"{gateway}/v1/chat/completions", json=body)
            await trio.sleep(0.05)

    def row_state(name: str) -> str:
        return f"document.querySelector('tr[data-backend=\"{name}\"]')?.dataset.state ?? null"

    async with trio.open_nursery() as background, headless_chromium(CHROMIUM) as page:
        background.start_soon(traffic)
        await page.navigate(f"{gateway}{PAGE}?token={TOKEN}")
        with trio.fail_after(20):
            while (
                await page.evaluate(
                    "[...document.querySelectorAll('tr[data-backend]')]"
                    ".map(row => row.dataset.backend + '=' + row.dataset.state).join(' ')"
                )
                != "alpha=closed beta=closed gamma=closed"
            ):
                await trio.sleep(0.05)
        assert await page.evaluate(BADGE) == "live"
        with trio.fail_after(10):  # the engine's own reading, once the reader has one
            while "vllm" not in await page.evaluate(ROW_TEXT.format(name="alpha")):
                await trio.sleep(0.05)
        await trio.sleep(3)  # a few seconds of traffic in the charts

        await mocks[2].child.kill()
        killed_at = time.monotonic()
        with trio.fail_after(STATE_CHANGE_BOUND):
            while (state := await page.evaluate(row_state("gamma"))) == "closed":
                await trio.sleep(0.02)
        changed_after = time.monotonic() - killed_at
        assert state == "open"
        assert await page.evaluate(row_state("alpha")) == "closed"
        assert await page.evaluate(row_state("beta")) == "closed"
        assert await page.evaluate(BADGE) == "live"  # connected, and every snapshot rendered
        await trio.sleep(0.3)  # the row's new colour is painted
        await page.screenshot(SCREENSHOT)
        background.cancel_scope.cancel()

    print(f"gamma's row turned {state} {changed_after:.2f} s after the kill; see {SCREENSHOT}")


async def test_an_open_dashboard_does_not_hold_up_a_shutdown(
    tmp_path: Path, start_mock: StartMock, spawn: Spawn
) -> None:
    """SIGTERM: the feed closes "going away" at once, so the drain does not wait for the page
    (graceful_timeout here is 30 s)."""
    mock = await start_mock()
    gateway, url = await spawn_serve(spawn, tmp_path, mock.url)
    async with open_websocket_url(feed_url(url)) as socket:
        await socket.get_message()
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await socket.get_message()
    assert closed.value.reason.code == 1001
    with trio.fail_after(20):
        assert await gateway.process.wait() == 0
    assert time.monotonic() - started < 10
