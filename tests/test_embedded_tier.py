"""`[shared] url = "embedded"`: the private valkey-server never outlives its `ntonix serve`,
even one killed with SIGKILL, and the directory such a kill leaves is gone at the next start."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StartMock
from tests.shared_support import tier_toml
from tests.support import SERVE, Spawn, serving, wait_until

EMBEDDED = rb"embedded valkey-server \(pid (\d+)\) on (\S+)"


@pytest.fixture
def temporary() -> Iterator[str]:
    """TMPDIR for the gateways of one test: the start-up sweep there sees only theirs. Short,
    as a unix socket's path must fit in 108 bytes."""
    directory = tempfile.mkdtemp(prefix="ntx-t-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie no init reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_sigkilled_serve_takes_its_valkey_server_along_and_the_next_start_sweeps_up(
    spawn: Spawn, tmp_path: Path, start_mock: StartMock, temporary: str, workers: int
) -> None:
    mock = await start_mock()
    config = tmp_path / "ntonix.toml"
    config.write_text(tier_toml(mock.url, "embedded"))
    command = (*SERVE, "--workers", str(workers), "--config", str(config))
    gateway = await spawn(*command, env={"TMPDIR": temporary})
    found = await gateway.wait_for(EMBEDDED)
    valkey, directory = int(found.group(1)), Path(found.group(2).decode()).parent
    await serving(gateway, workers)

    os.kill(gateway.pid, signal.SIGKILL)
    await gateway.process.wait()

    # The kernel kills the server at once; the rest of the bound is for a loaded machine.
    await wait_until(lambda: not _running(valkey), timeout=3)
    assert directory.exists()  # the parent had no chance to remove it

    again = await spawn(*command, env={"TMPDIR": temporary})
    await again.wait_for(EMBEDDED)
    assert not directory.exists()
    assert f"removed {directory}".encode() in again.output
    await serving(again, workers)
    assert await again.stop(signal.SIGTERM) == 0, again.output.decode()
    assert [name for name in os.listdir(temporary) if name.startswith("ntonix-valkey-")] == []
