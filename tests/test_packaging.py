"""What `pip install .` puts into site-packages, and the demo running from there.

The wheel is built once for the module (pip wheel: a few seconds, and hatchling from the
package index or pip's cache). The contract: issue 10 item 6.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import trio

from tests.support import REPO_ROOT, Spawn, chat


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), "."],
        cwd=REPO_ROOT,
        check=True,
        timeout=300,
    )
    (built,) = out.glob("ntonix-*.whl")
    return built


def test_the_wheel_ships_the_mocks_inside_ntonix_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"ntonix", f"{wheel.name.split('-py3')[0]}.dist-info"}
    shipped = sorted(name for name in names if name.startswith("ntonix/mocks/"))
    sources = sorted(f"ntonix/mocks/{path.name}" for path in (REPO_ROOT / "mocks").glob("*.py"))
    assert shipped == sources  # every module, and nothing else (no Dockerfile, no caches)
    assert "ntonix/dashboard.html" in names
    assert "ntonix/devcerts.py" in names


async def test_demo_runs_from_the_installed_layout(
    wheel: Path, tmp_path: Path, spawn: Spawn
) -> None:
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    # The wheel's ntonix first on the path, started outside the checkout: what an installed
    # `ntonix demo` imports (its dependencies come from the test's environment).
    demo = await spawn(
        sys.executable,
        "-c",
        f"import os, sys; os.chdir({str(tmp_path)!r}); from ntonix.cli import main; "
        "sys.exit(main(['demo', '--port', '0']))",
        env={"PYTHONPATH": str(site)},
    )
    url = (await demo.wait_for(rb"gateway on (http://127\.0\.0\.1:\d+)")).group(1).decode()
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(f"{url}/v1/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.content.endswith(b"data: [DONE]\n\n")
    # The mocks it started are the wheel's, and the restart line it suggests says so.
    assert b" -m ntonix.mocks.llm --port " in demo.output
    mock_pid = int(demo.output.split(b"kill -9 ")[1].split()[0])
    cmdline = (await trio.Path(f"/proc/{mock_pid}/cmdline").read_bytes()).split(b"\0")
    assert cmdline[1:3] == [b"-m", b"ntonix.mocks.llm"]
    assert await demo.stop(signal.SIGINT) == 0
