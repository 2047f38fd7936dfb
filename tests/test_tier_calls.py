"""What a worker's misses cost the shared tier in calls: at most one lookup call out at a time
(the lookups that come meanwhile go together in the next), on a busy worker a lookup call that
waits for the lookups of the requests the loop is still working on (`lookup_hold`), the look
for followers of the flights it leads and the entries to store riding in that call (a pipeline
of their own only for an entry no lookup carried within STORE_WAIT), and no PING while calls
answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest
import trio

from ntonix.cache import Flight
from ntonix.core.lru import CachedResponse
from ntonix.errors import Dialect
from ntonix.shared_cache import STORE_WAIT, SharedCache
from ntonix.shared_flights import Lead, SharedFlights
from ntonix.shared_keys import watch_name
from ntonix.tier import PROBE_INTERVAL, SharedTier
from tests.shared_support import ValkeyServer, tier_config
from tests.support import wait_until

PAUSE_MS = 300
HOLD = 0.5  # seconds: long enough that only the loop's running out of work ends it here


@pytest.fixture
async def tier(valkey: ValkeyServer) -> AsyncIterator[SharedTier]:
    tier = SharedTier.from_settings(tier_config("http://127.0.0.1:1", valkey.url).shared)
    await tier.connect()
    yield tier
    await tier.aclose()


def _cache(tier: SharedTier) -> SharedCache:
    return SharedCache(tier, ttl=60.0, flights=SharedFlights(tier, lease=10.0))


async def test_lookups_that_come_while_one_call_is_out_go_together_in_the_next(
    valkey: ValkeyServer, tier: SharedTier
) -> None:
    shared = _cache(tier)
    answers: dict[str, object] = {}

    async def fetch(key: str) -> None:
        answers[key] = await shared.fetch(key)

    async with valkey.client() as admin:
        # Valkey holds every command for a while: the first lookup's call stays out.
        await admin.custom_command(["CLIENT", "PAUSE", str(PAUSE_MS), "ALL"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch, "a" * 64)
        await wait_until(lambda: tier.calls == 1)
        for key in ("b", "c", "d"):
            nursery.start_soon(fetch, key * 64)
            await trio.sleep(0.01)  # each in a scheduling round of its own

    assert tier.calls == 2
    assert all(isinstance(answer, Lead) for answer in answers.values()), answers


async def test_a_busy_workers_lookup_call_waits_for_the_lookups_the_loop_is_working_towards(
    valkey: ValkeyServer,
) -> None:
    settings = attrs.evolve(tier_config("http://127.0.0.1:1", valkey.url).shared, lookup_hold=HOLD)
    tier = SharedTier.from_settings(settings)
    await tier.connect()
    shared = _cache(tier)
    answers: dict[str, object] = {}

    async def request(key: str, work: int) -> None:
        for _ in range(work):  # the loop parsing and routing it before it reaches the tier
            await trio.lowlevel.checkpoint()
        answers[key] = await shared.fetch(key)

    try:
        async with trio.open_nursery() as nursery:
            for work, key in enumerate("abcd"):
                nursery.start_soon(request, key * 64, 5 * work)
        assert tier.calls == 1  # without the hold: "a" alone, then the others
        assert all(isinstance(answer, Lead) for answer in answers.values()), answers

        started = trio.current_time()
        assert isinstance(await shared.fetch("e" * 64), Lead)
        assert tier.calls == 2
        assert trio.current_time() - started < HOLD / 2  # an idle loop sends at once
    finally:
        await tier.aclose()


async def test_a_lookup_call_carries_the_look_for_followers_of_the_flights_led(
    valkey: ValkeyServer, tier: SharedTier
) -> None:
    shared = _cache(tier)
    flights = shared.flights
    led = await shared.fetch("a" * 64)
    assert isinstance(led, Lead)
    flight = Flight("a" * 64, b"request-1", store=True, dialect=Dialect.OPENAI)
    flights.lead(flight, "a" * 64, led.flight_id)
    async with valkey.client() as follower:
        await follower.set(watch_name(led.flight_id), "1")

    await shared.fetch("b" * 64)  # no publisher task runs: only the lookup can look

    assert tier.calls == 2
    assert flights.watch_marks(trio.current_time()) == ([], [])  # it is known watched


async def test_entries_go_out_alone_only_when_no_lookup_carried_them_within_the_wait(
    tier: SharedTier,
) -> None:
    shared = _cache(tier)
    answer = CachedResponse(200, ((b"content-type", b"application/json"),), (b"{}",), 0.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shared.store_forever)
        # A busy worker: an entry waits a few ms, then a lookup carries it. Over several
        # STORE_WAITs the writer's timer must never send one of them on its own.
        lookups = 0
        while lookups * STORE_WAIT / 10 < 3 * STORE_WAIT:
            shared.store([(f"stored {lookups}".ljust(64, "-"), answer)])
            await trio.sleep(STORE_WAIT / 10)
            await shared.fetch(str(lookups).ljust(64, "-"))
            lookups += 1
        assert (tier.calls, shared.stored) == (lookups, lookups)

        shared.store([("z" * 64, answer)])  # then no lookup: it goes alone after STORE_WAIT
        await wait_until(lambda: shared.stored == lookups + 1)
        assert tier.calls == lookups + 1
        nursery.cancel_scope.cancel()


async def test_the_prober_pings_only_when_no_call_answered_lately(tier: SharedTier) -> None:
    shared = _cache(tier)
    assert not await tier.refuses_cluster()  # as the gateway's start-up asks: one call
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier.probe_forever)
        for n in range(8):  # a call every quarter of the probe interval: no PING needed
            await shared.fetch(str(n) * 64)
            await trio.sleep(PROBE_INTERVAL / 4)
        assert tier.calls == 1 + 8
        await wait_until(lambda: tier.calls == 1 + 9, timeout=3 * PROBE_INTERVAL)  # then one
        nursery.cancel_scope.cancel()
