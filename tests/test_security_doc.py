"""The TLS walk-through in docs/security.md, run as written against real processes.

The commands are read from the doc (the ```sh block that starts with `nox -s certs` and the
```python block after it), so a change to either that breaks them fails here. Only the ports
change: 8000 and 8001 become free ports, as every test here binds its own. They run in a
scratch directory that holds what `nox -s certs` needs (noxfile.py and devcerts.py), with the
test's virtual environment first on PATH (`python`, `ntonix`, `nox`) and the checkout on
PYTHONPATH (`python -m mocks.llm`), as in the activated environment the doc asks for.
Cost: `nox -s certs` makes a virtual environment and installs trustme (2-10 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import trio

from tests.support import REPO_ROOT, Spawn

DOC = REPO_ROOT / "docs" / "security.md"


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def walk_through() -> tuple[list[str], str]:
    """The shell commands (continuations joined) and the Python snippet of the walk-through."""
    text = DOC.read_text()
    (shell,) = [block for block in _blocks(text, "sh") if block.startswith("nox -s certs\n")]
    commands = shell.replace("\\\n", " ").strip().splitlines()
    after = text[text.index(shell) + len(shell) :]
    return commands, _blocks(after, "python")[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_walk_through_has_the_steps_this_test_expects() -> None:
    commands, snippet = walk_through()
    assert [command.split()[0] for command in commands] == [
        "nox",
        "python",
        "printf",
        "ntonix",
        "curl",
        "curl",
    ]
    assert '"model": "mock-llm"' in commands[-1]
    assert "https://127.0.0.1:8000/v1" in snippet


@pytest.mark.skipif(shutil.which("curl") is None, reason="the walk-through uses curl")
async def test_tls_walk_through_works_as_written(tmp_path: Path, spawn: Spawn) -> None:
    commands, snippet = walk_through()
    gateway_port, mock_port = _free_port(), _free_port()

    def ported(text: str) -> str:
        return (
            text.replace(":8000", f":{gateway_port}")
            .replace(":8001", f":{mock_port}")
            .replace("--port 8001", f"--port {mock_port}")
        )

    (tmp_path / "src" / "ntonix").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "noxfile.py", tmp_path)
    shutil.copy(REPO_ROOT / "src" / "ntonix" / "devcerts.py", tmp_path / "src" / "ntonix")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),
    }
    outputs = []
    for command in map(ported, commands):
        if command.endswith("&"):  # a server: started, then waited for as a reader would
            server = await spawn("bash", "-c", f"cd {tmp_path} && exec {command[:-1]}", env=env)
            await server.wait_for(rb"listening on|Running on", timeout=30)
            continue
        with trio.fail_after(120):
            result = await trio.run_process(
                ["bash", "-c", command], cwd=tmp_path, env=env, capture_stdout=True, check=False
            )
        assert result.returncode == 0, (command, result)
        outputs.append(result.stdout)
    health, stream = outputs[-2:]
    assert json.loads(health) == {"status": "ok"}
    assert b'"model":"mock-llm"' in stream
    assert stream.endswith(b"data: [DONE]\n\n")

    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-c", ported(snippet)],
            cwd=tmp_path,
            env=env,
            capture_stdout=True,
            check=False,
        )
    assert result.returncode == 0, result
    assert result.stdout.startswith(b"ChatCompletion(")
