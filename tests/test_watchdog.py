"""The worker's idle watch: which relays it cancels, and when."""

from __future__ import annotations

import math

import trio
import trio.testing

from ntonix.watchdog import TICK, IdleWatch


async def test_only_a_relay_silent_past_its_time_is_cancelled() -> None:
    watch = IdleWatch()
    silent, waiting, writing, gone = (trio.CancelScope() for _ in range(4))
    watch.watch(silent).expires = 10.0
    watch.watch(waiting).expires = 10.5
    watch.watch(writing).expires = math.inf  # writing to its client: back-pressure, not silence
    left = watch.watch(gone)
    left.expires = 1.0
    watch.forget(left)
    watch.check(10.0)
    cancelled = [s.cancel_called for s in (silent, waiting, writing, gone)]
    assert cancelled == [True, False, False, False]
    watch.check(11.0)
    assert waiting.cancel_called
    assert watch.expired == 2


async def test_a_cancelled_relay_is_counted_once() -> None:
    watch = IdleWatch()
    watch.watch(trio.CancelScope()).expires = 1.0
    watch.check(2.0)
    watch.check(3.0)
    assert watch.expired == 1


def test_the_watch_looks_at_least_four_times_per_timeout() -> None:
    watch = IdleWatch()
    watch.timeout(30.0)
    assert watch.tick == TICK
    watch.timeout(0.2)
    assert watch.tick == 0.05


async def test_a_silent_backend_is_cut_within_one_tick_of_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = IdleWatch()
    watch.timeout(2.0)  # a tick of 0.5 s
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        with trio.CancelScope() as relay:
            watch.watch(relay).expires = trio.current_time() + 2.0
            await trio.sleep_forever()
        assert 2.0 <= trio.current_time() <= 2.5
        nursery.cancel_scope.cancel()
