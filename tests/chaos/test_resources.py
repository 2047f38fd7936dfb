"""Faults 9 and 10 of issue 16: the access log's disk full, and the gateway out of file
descriptors. Neither may stop the serving: lines are dropped and counted; connections wait
(or are refused) until descriptors free up, with no crash, no busy loop and no backend blamed."""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.chaos.harness import CHAT, Cluster, chat, open_fds, start_cluster
from tests.chaos.load import LONG_STREAM, Load
from tests.chaos.netns import Node
from tests.support import Spawn


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted whatever happens."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _dropped(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("ntonix_access_log_dropped_lines_total "):
            return float(line.split()[1])
    raise AssertionError("no ntonix_access_log_dropped_lines")


@pytest.mark.chaos
async def test_a_full_disk_drops_and_counts_access_log_lines_and_serving_goes_on(
    spawn: Spawn, nodes: list[Node], client: httpx.AsyncClient, tmp_path: Path, full_disk: Path
) -> None:
    log = full_disk / "access.log"
    cluster = await start_cluster(spawn, nodes, client, tmp_path, log={"access_log": str(log)})
    filler = full_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space left"):
        while True:
            os.write(fd, b"x" * 4096)
    os.close(fd)
    statuses = []
    for _ in range(200):
        response = await client.post(f"{cluster.url}{CHAT}", json=chat(False))
        statuses.append(response.status_code)
    assert statuses == [200] * 200
    metrics = (await client.get(f"{cluster.url}/metrics")).text
    with trio.fail_after(5):
        while _dropped(metrics) == 0:
            await trio.sleep(0.2)
            metrics = (await client.get(f"{cluster.url}/metrics")).text
    assert cluster.gateway.output.count(b"cannot write") == 1  # once, not five times a second
    filler.unlink()  # room again: the next lines are written
    size = log.stat().st_size
    await client.post(f"{cluster.url}{CHAT}", json=chat(False))
    with trio.fail_after(5):
        while log.stat().st_size <= size:
            await trio.sleep(0.1)
    await cluster.gateway.wait_for(rb"access log \S+: writing again")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


@pytest.mark.chaos
async def test_out_of_file_descriptors_new_connections_wait_streams_go_on_and_service_resumes(
    cluster: Cluster,
) -> None:
    pid = cluster.gateway.pid
    spare = 12
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + spare, 4096))
    load = Load(cluster.url, rate=1, streams=0)
    async with load.client, trio.open_nursery() as nursery:
        # Each stream holds two descriptors (the client's, the backend's): 8 of them need 16.
        for _ in range(8):
            nursery.start_soon(load.stream, {**LONG_STREAM, "x-mock-token-delay": "0.1"})
        await trio.sleep(1.5)
        before = _cpu_seconds(pid)
        await trio.sleep(2.0)
        busy = _cpu_seconds(pid) - before
    streams = load.streamed()
    assert len(streams) == 8
    # The streams that got their descriptors finish; the others are told the gateway is short
    # of them (503, retry), and no backend is blamed for it.
    assert {seen.status for seen in streams} == {200, 503}, streams
    assert all(seen.end == "done" for seen in streams if seen.status == 200), streams
    assert busy < 1.0, busy  # waiting for descriptors, not spinning
    metrics = (await cluster.client.get(f"{cluster.url}/metrics")).text
    assert 'to_state="open"' not in metrics
    assert 'outcome="gateway_failed"' in metrics
    await cluster.gateway.wait_for(rb"gateway cannot open a connection to backend m\d: .*Too many")
    response = await cluster.client.post(f"{cluster.url}{CHAT}", json=chat(False))
    assert response.status_code == 200
    for backend in (await cluster.status())["backends"]:
        assert backend["state"] == "closed", backend
