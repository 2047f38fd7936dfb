"""Fault 7 of issue 16: clients that read one byte a second, trickle their head, or vanish
behind a partitioned link (no FIN). Each runs alone in a namespace of its own; the gateway's
send timeout (TCP_USER_TIMEOUT, 30 s in `ntonix serve`) is 2 s here. Each client must be cut by
a timeout and leave no slot, connection, task or upstream request behind."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.chaos.harness import start_cluster, urls_of
from tests.chaos.netns import Topology
from tests.support import PYTHON, Spawn

CASES = ["slow-reader", "slowloris", "half-open"]


@pytest.mark.chaos
@pytest.mark.parametrize("mode", CASES)
async def test_a_hostile_client_is_cut_by_a_timeout_and_frees_everything(
    mode: str, spawn: Spawn, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    with Topology(4) as nodes:
        outside = nodes[3]
        cluster = await start_cluster(
            spawn,
            nodes[:3],
            client,
            tmp_path,
            binds=("127.0.0.1:0", f"{outside.host_address}:0"),
            env={"NTONIX_SEND_TIMEOUT": "2"},
        )
        with trio.fail_after(10):
            while len(urls_of(cluster.gateway)) < 2:
                await trio.sleep(0.01)
        public = next(url for url in urls_of(cluster.gateway) if outside.host_address in url)
        host, port = public.removeprefix("http://").rsplit(":", 1)
        baseline = await cluster.baseline()
        argv = [PYTHON, "-m", "tests.chaos.client", mode, host, port]
        hostile = await spawn(*outside.exec_argv(*argv))
        await hostile.wait_for(rb"started")
        if mode != "slowloris":
            await _until(lambda: _streaming(cluster))
        if mode == "half-open":
            outside.partition()
        # Cut within the send timeout (2 s) or Hypercorn's timeouts, plus slack.
        await cluster.settled(baseline, timeout=30)
        if mode == "half-open":
            outside.heal()
        if mode == "slowloris":  # closed by the gateway (the others' end is the kernel's, silent)
            await hostile.wait_for(rb"closed by the gateway|connection error", timeout=10)


async def _streaming(cluster: object) -> bool:
    status = await cluster.status()  # type: ignore[attr-defined]
    return any(backend["active_requests"] for backend in status["backends"])


async def _until(check: object, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not await check():  # type: ignore[operator]
            await trio.sleep(0.02)
