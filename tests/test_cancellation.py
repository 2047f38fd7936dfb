"""A client that leaves cancels its upstream at once, in every phase, and nothing leaks."""

from __future__ import annotations

import random
from functools import partial

import httpx
import trio

from ntonix.config import BackendSettings
from tests.conftest import RunningMock, StartGateway, StartMock
from tests.support import RawClient, chat, pool_totals, status, wait_until

# The contract is 100 ms; tests allow more on a loaded CI machine, the benchmark measures it.
GENEROUS_CLOSE_BOUND = 0.5


async def _assert_upstream_closed_soon(mock: RunningMock, hung_up_at: float) -> None:
    await wait_until(lambda: mock.stats["client_disconnects"] == 1, timeout=2)
    seen_at = mock.stats["disconnects"][-1]["at"]
    assert seen_at - hung_up_at < GENEROUS_CLOSE_BOUND
    await wait_until(lambda: mock.stats["active"] == 0, timeout=2)


async def _assert_gateway_is_clean(client: httpx.AsyncClient, gateway: str) -> None:
    totals = pool_totals(await status(client, gateway))
    assert totals["in_use"] == 0
    assert totals["opened"] - totals["closed"] == totals["idle"]
    snapshot = await status(client, gateway)
    assert snapshot["queued"] == 0
    assert all(backend["active_requests"] == 0 for backend in snapshot["backends"])


async def test_disconnect_mid_stream_closes_upstream(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=200, token_delay=0.02)
    gateway = await start_gateway(mock)
    raw = await RawClient.connect(gateway)
    await raw.send_request("POST", "/v1/chat/completions", chat())
    await raw.read_until(b'"content"')
    hung_up_at = await raw.hang_up()
    await _assert_upstream_closed_soon(mock, hung_up_at)
    assert mock.stats["completed"] == 0
    await _assert_gateway_is_clean(client, gateway)


async def test_disconnect_while_waiting_for_first_byte_closes_upstream(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway(mock)
    raw = await RawClient.connect(gateway)
    await raw.send_request("POST", "/v1/chat/completions", chat(), headers={"x-mock-hang": "1"})
    await wait_until(lambda: mock.stats["active"] == 1)
    hung_up_at = await raw.hang_up()
    await _assert_upstream_closed_soon(mock, hung_up_at)
    await _assert_gateway_is_clean(client, gateway)


async def test_disconnect_during_non_streaming_request_closes_upstream(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=100, token_delay=0.02)
    gateway = await start_gateway(mock)
    raw = await RawClient.connect(gateway)
    await raw.send_request("POST", "/v1/chat/completions", chat(stream=False))
    await wait_until(lambda: mock.stats["active"] == 1)
    await trio.sleep(0.1)
    hung_up_at = await raw.hang_up()
    await _assert_upstream_closed_soon(mock, hung_up_at)
    await _assert_gateway_is_clean(client, gateway)


async def test_disconnect_while_the_body_is_read_never_reaches_the_backend(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock()
    gateway = await start_gateway(mock)
    raw = await RawClient.connect(gateway)
    await raw.send_request("POST", "/v1/chat/completions", chat(), body_bytes_to_send=10)
    await trio.sleep(0.1)
    await raw.hang_up()
    await trio.sleep(0.1)
    assert mock.stats["requests"] == 0
    await _assert_gateway_is_clean(client, gateway)
    # The gateway still serves.
    response = await client.post(f"{gateway}/v1/chat/completions", json=chat(stream=False))
    assert response.status_code == 200


async def test_cancellation_storm_leaves_the_pool_clean(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    """Hundreds of streams cancelled at random moments, many while waiting for a connection."""
    mock = await start_mock(tokens=10, token_delay=0.01)
    backend_limit = 16
    gateway = await start_gateway(
        BackendSettings(name="only", url=mock.url, max_concurrent=backend_limit), queue_timeout=30
    )
    rng = random.Random(1093)
    completed = 0
    cancelled = 0

    async def one_stream(cancel_after: float | None) -> None:
        nonlocal completed, cancelled
        with trio.move_on_after(cancel_after if cancel_after is not None else 60) as scope:
            raw = await RawClient.connect(gateway)
            try:
                await raw.send_request("POST", "/v1/chat/completions", chat(f"q{rng.random()}"))
                await raw.read_until(b"data: [DONE]", timeout=60)
            finally:
                raw.stream.socket.close()
        if scope.cancelled_caught:
            cancelled += 1
        else:
            completed += 1

    async with trio.open_nursery() as nursery:
        for index in range(400):
            cancel_after = rng.uniform(0.0, 0.5) if index % 4 else None
            nursery.start_soon(one_stream, cancel_after)

    assert cancelled > 200
    assert completed >= 100
    await wait_until(lambda: mock.stats["active"] == 0)
    snapshot = await status(client, gateway)
    assert snapshot["queued"] == 0
    assert snapshot["backends"][0]["active_requests"] == 0
    totals = pool_totals(snapshot)
    assert totals["in_use"] == 0
    assert totals["idle"] <= backend_limit
    assert totals["opened"] - totals["closed"] == totals["idle"]
    # Every slot is usable again: a full batch at the limit goes through at once.
    async with trio.open_nursery() as nursery:
        for _ in range(backend_limit * 2):
            nursery.start_soon(
                partial(client.post, f"{gateway}/v1/chat/completions", json=chat(stream=False))
            )
    await wait_until(lambda: mock.stats["active"] == 0, timeout=2)
    assert pool_totals(await status(client, gateway))["in_use"] == 0


async def test_no_task_outlives_its_request(
    start_mock: StartMock, start_gateway: StartGateway, client: httpx.AsyncClient
) -> None:
    mock = await start_mock(tokens=50, token_delay=0.01)
    gateway = await start_gateway(mock)
    # Let every fixture task settle: a completed request leaves nothing behind either.
    await client.post(f"{gateway}/v1/chat/completions", json=chat(stream=False))
    await trio.sleep(0.1)
    tasks_before = _task_count()
    for _ in range(5):
        raw = await RawClient.connect(gateway)
        await raw.send_request("POST", "/v1/chat/completions", chat())
        await raw.read_until(b'"content"')
        await raw.hang_up()
    await wait_until(lambda: mock.stats["client_disconnects"] == 5)
    await wait_until(lambda: _task_count() <= tasks_before, timeout=2)


def _task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for n in task.child_nurseries for child in n.child_tasks)

    return count(trio.lowlevel.current_root_task())
