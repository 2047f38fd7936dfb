"""(e) Upstream clients compared: `python -m bench.clients SPEC_JSON` prints one JSON result.

Why this exists: the gateway speaks to backends through its own h11 pool (`ntonix.upstream`)
instead of httpx. This measures both, in one process and one run, against the same mocks:
requests per second at 64 concurrent requests, and whether each pool recovers after a storm of
requests cancelled at random moments while others wait for a connection (httpcore #1093).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import httpx
import trio

from bench.load import raise_open_file_limit
from ntonix.config import BackendSettings
from ntonix.errors import GatewayError
from ntonix.upstream import BackendPool

PATH = "/v1/chat/completions"
CHAT_BODY = json.dumps({"model": "mock-llm", "messages": [{"role": "user", "content": "Hi"}]})
STREAM_BODY = json.dumps(
    {"model": "mock-llm", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
)
# Storm requests stream for about 0.2 s and are cancelled somewhere in the first 0.3 s: some
# while waiting for a slot, some while connecting, some mid-body.
STORM_HEADERS = {"x-mock-ttft": "0.01", "x-mock-tokens": "20", "x-mock-token-delay": "0.01"}
STORM_REQUESTS = 400
STORM_GROUP = 20  # requests cancelled together
STORM_LIMIT = 100  # connections (httpx) or max_concurrent (ours)
CANCEL_WITHIN = 0.3
# The leak probe: STORM_LIMIT requests at once, each holding its connection for HOLD seconds.
# With every slot free they all start at once; each leaked slot makes one of them wait for
# HOLD > PROBE_POOL_TIMEOUT, so it fails. The failures count the leaked slots.
HOLD_HEADERS = {"x-mock-ttft": "0.3", "x-mock-tokens": "1", "x-mock-token-delay": "0"}
PROBE_POOL_TIMEOUT = 0.15


@dataclass(frozen=True)
class ClientSpec:
    urls: list[str]
    seconds: float
    concurrency: int = 64
    storm_rounds: int = 3
    seed: int = 1


@dataclass
class Rate:
    rate: float  # requests per second
    errors: int
    cpu: float  # CPU seconds this process used while measuring


@dataclass
class LeakCheck:
    storm_errors: int  # storm requests that failed with something other than cancellation
    probe_failures: int  # probe requests that timed out waiting for a pool slot
    probe_errors: int  # probe requests that failed otherwise
    details: dict[str, int] = field(default_factory=dict)


@dataclass
class ClientsResult:
    httpx: Rate
    pool: Rate
    httpx_leak: LeakCheck
    pool_leak: LeakCheck
    seconds: float  # length of each rate measurement

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientsResult:
        return cls(
            httpx=Rate(**data["httpx"]),
            pool=Rate(**data["pool"]),
            httpx_leak=LeakCheck(**data["httpx_leak"]),
            pool_leak=LeakCheck(**data["pool_leak"]),
            seconds=data["seconds"],
        )


async def _measure(
    seconds: float, concurrency: int, one_request: Callable[[int], Awaitable[bool]]
) -> Rate:
    """Run `one_request(task_index)` back to back in `concurrency` tasks; count the window."""
    done = errors = 0
    warmup = 0.5
    opens = trio.current_time() + warmup
    closes = opens + seconds

    async def worker(index: int) -> None:
        nonlocal done, errors
        while trio.current_time() < closes:
            ok = await one_request(index)
            if opens <= trio.current_time() < closes:
                if ok:
                    done += 1
                else:
                    errors += 1

    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(worker, index)
        await trio.sleep_until(opens)
        cpu = time.process_time()
        await trio.sleep_until(closes)
        cpu = time.process_time() - cpu
    return Rate(done / seconds, errors, cpu)


async def _storm(
    spec: ClientSpec, rng: random.Random, request: Callable[[], Awaitable[None]]
) -> None:
    """`storm_rounds` rounds of STORM_REQUESTS requests started at once, cancelled in groups at
    random moments, as a gateway cancels the upstreams of clients that leave together.

    Groups matter: a slot freed by one cancelled request is handed to a waiting request that is
    being cancelled in the same scheduler batch, which is the window httpcore #1093 leaks in.
    """

    async def group(members: int, cancel_after: float) -> None:
        with trio.move_on_after(cancel_after):
            async with trio.open_nursery() as nursery:
                for _ in range(members):
                    nursery.start_soon(request)
                    # Interleave the groups in the pool's queue: each group then holds some
                    # connections and waits for others.
                    await trio.lowlevel.checkpoint()

    groups = STORM_REQUESTS // STORM_GROUP
    for _ in range(spec.storm_rounds):
        async with trio.open_nursery() as nursery:
            for _ in range(groups):
                nursery.start_soon(group, STORM_GROUP, rng.uniform(0, CANCEL_WITHIN))


# --- httpx ----------------------------------------------------------------------------------


async def httpx_rate(spec: ClientSpec) -> Rate:
    # One client per backend, as the gateway would hold one pool per backend: a single client
    # over several origins churns connections between them once max_connections is reached.
    share = max(1, spec.concurrency // len(spec.urls))
    limits = httpx.Limits(max_connections=share, max_keepalive_connections=share)
    headers = {"content-type": "application/json"}
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=10.0))
            for _ in spec.urls
        ]

        async def one(index: int) -> bool:
            slot = index % len(spec.urls)
            try:
                response = await clients[slot].post(
                    spec.urls[slot] + PATH, content=CHAT_BODY, headers=headers
                )
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        return await _measure(spec.seconds, spec.concurrency, one)


async def httpx_leak(spec: ClientSpec) -> LeakCheck:
    rng = random.Random(spec.seed)
    url = spec.urls[0] + PATH
    storm_errors = 0
    limits = httpx.Limits(max_connections=STORM_LIMIT, max_keepalive_connections=STORM_LIMIT)
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:

        async def storm_request() -> None:
            nonlocal storm_errors
            try:
                async with client.stream(
                    "POST", url, content=STREAM_BODY, headers=STORM_HEADERS
                ) as response:
                    async for _ in response.aiter_raw():
                        pass
            except httpx.HTTPError:
                storm_errors += 1

        await _storm(spec, rng, storm_request)
        await trio.sleep(0.2)
        details = _httpx_pool_state(client)

        failures = errors = 0
        timeout = httpx.Timeout(10.0, pool=PROBE_POOL_TIMEOUT)

        async def probe() -> None:
            nonlocal failures, errors
            try:
                await client.post(url, content=CHAT_BODY, headers=HOLD_HEADERS, timeout=timeout)
            except httpx.PoolTimeout:
                failures += 1
            except httpx.HTTPError:
                errors += 1

        async with trio.open_nursery() as nursery:
            for _ in range(STORM_LIMIT):
                nursery.start_soon(probe)
    return LeakCheck(storm_errors, failures, errors, details)


def _httpx_pool_state(client: httpx.AsyncClient) -> dict[str, int]:
    """Connections httpcore holds after the storm, and how many of them are stuck connecting.

    Private attributes: read for the report only, and tolerated if they move.
    """
    try:
        connections = client._transport._pool.connections  # type: ignore[attr-defined]
        return {
            "connections": len(connections),
            "stuck_connecting": sum(1 for c in connections if c.info() == "CONNECTING"),
        }
    except AttributeError:
        return {}


# --- the project's pool ----------------------------------------------------------------------


def _pool_request_headers(
    backend: BackendSettings, body: str, extra: dict[str, str]
) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"host", backend.host_header),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return headers + [(name.encode(), value.encode()) for name, value in extra.items()]


class NoSlot(Exception):
    """The pool had no free slot within the probe's timeout."""


async def _pool_exchange(
    pool: BackendPool,
    body: str,
    headers: list[tuple[bytes, bytes]],
    slots: trio.Semaphore | None = None,
    slot_timeout: float = math.inf,
) -> int:
    """One request through `pool`, the way the gateway's proxy does it: slot (the proxy's
    admission for a backend at max_concurrent), then connection, each given back in a
    `finally`. Returns the status."""
    if slots is not None:
        with trio.move_on_after(slot_timeout) as waiting:
            await slots.acquire()
        if waiting.cancelled_caught:
            raise NoSlot
    try:
        connection = pool.checkout_idle() or await pool.connect()
        try:
            await connection.send_request(b"POST", PATH.encode(), headers, body.encode())
            response = await connection.receive_response()
            done = False
            while not done:
                _, done = await connection.receive_body()
            return response.status_code
        finally:
            pool.checkin(connection)
    finally:
        if slots is not None:
            slots.release()


async def pool_rate(spec: ClientSpec) -> Rate:
    pools = [
        BackendPool(BackendSettings(name=f"m{i}", url=url), None) for i, url in enumerate(spec.urls)
    ]
    plans = [(pool, _pool_request_headers(pool.backend, CHAT_BODY, {})) for pool in pools]

    async def one(index: int) -> bool:
        pool, headers = plans[index % len(plans)]
        try:
            return await _pool_exchange(pool, CHAT_BODY, headers) == 200
        except GatewayError:
            return False

    try:
        return await _measure(spec.seconds, spec.concurrency, one)
    finally:
        for pool in pools:
            pool.retire()


async def pool_leak(spec: ClientSpec) -> LeakCheck:
    rng = random.Random(spec.seed)
    backend = BackendSettings(name="m0", url=spec.urls[0], max_concurrent=STORM_LIMIT)
    pool = BackendPool(backend, None)
    slots = trio.Semaphore(STORM_LIMIT)
    storm_headers = _pool_request_headers(backend, STREAM_BODY, STORM_HEADERS)
    hold_headers = _pool_request_headers(backend, CHAT_BODY, HOLD_HEADERS)
    storm_errors = 0

    async def storm_request() -> None:
        nonlocal storm_errors
        try:
            await _pool_exchange(pool, STREAM_BODY, storm_headers, slots)
        except GatewayError:
            storm_errors += 1

    try:
        await _storm(spec, rng, storm_request)
        await trio.sleep(0.2)
        after_storm = pool.statistics()
        failures = errors = 0

        async def probe() -> None:
            nonlocal failures, errors
            try:
                await _pool_exchange(pool, CHAT_BODY, hold_headers, slots, PROBE_POOL_TIMEOUT)
            except NoSlot:
                failures += 1
            except GatewayError:
                errors += 1

        async with trio.open_nursery() as nursery:
            for _ in range(STORM_LIMIT):
                nursery.start_soon(probe)
        details = {
            "in_use": after_storm.in_use,
            "waiting": slots.statistics().tasks_waiting,
            "free_slots": slots.value,
        }
        return LeakCheck(storm_errors, failures, errors, details)
    finally:
        pool.retire()


async def run(spec: ClientSpec) -> ClientsResult:
    return ClientsResult(
        httpx=await httpx_rate(spec),
        pool=await pool_rate(spec),
        httpx_leak=await httpx_leak(spec),
        pool_leak=await pool_leak(spec),
        seconds=spec.seconds,
    )


def main(argv: list[str]) -> int:
    raise_open_file_limit()
    spec = ClientSpec(**json.loads(argv[0]))
    result = trio.run(partial(run, spec))
    json.dump(asdict(result), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
