"""Faults 1-6 of issue 16: backends killed, frozen, cut off, slowed, reset, or talking garbage.

Each test runs the load (non-streaming requests at a steady rate, long streams) over three mocks
in their own namespaces, injects the fault into one of them, checks what the clients saw and
what the gateway's status says, then that the gateway and the mocks are back to their idle
baseline: no task, connection or fd left over, RSS within 5%.
"""

from __future__ import annotations

import trio

from tests.chaos.harness import Cluster
from tests.chaos.load import Load, failures


async def _under_load(cluster: Cluster, nursery: trio.Nursery, **options: float) -> Load:
    load = Load(cluster.url, **options)  # type: ignore[arg-type]
    await nursery.start(load.run)
    return load


async def test_a_killed_backend_costs_no_request_and_rejoins_after_restart(
    cluster: Cluster,
) -> None:
    baseline = await cluster.baseline()
    victim = cluster.mocks[0]
    async with trio.open_nursery() as nursery:
        load = await _under_load(cluster, nursery)
        await trio.sleep(1.0)
        await victim.child.kill()  # type: ignore[union-attr]
        await cluster.wait_backend("m0", "open", timeout=5)
        await trio.sleep(1.0)
        await victim.start()
        rejoined = await cluster.wait_backend("m0", "closed", timeout=10)
        await trio.sleep(1.0)
        load.stop()
    assert not failures(load.seen), failures(load.seen)[:5]
    streams = load.streamed()
    # A stream on the killed backend ends with the error event, never like a finished one.
    assert all(seen.end in {"done", "error"} for seen in streams), streams
    assert sum(seen.end == "done" for seen in streams) >= len(streams) - 6
    assert rejoined < 10
    after_restart = [seen for seen in load.plain() if seen.started > load.seen[-1].started - 1]
    assert any(seen.backend == "m0" for seen in load.plain()[-40:]), after_restart[:5]
    await cluster.settled(baseline)
