"""`ntonix demo` as a user meets it: a mock killed by hand, a busy port, `--tls`.

Each test runs the real command in a child process and reads what it prints. The contract:
issue 10 item 7.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path

import trio

from tests.support import Spawn

DEMO = (sys.executable, "-m", "ntonix.cli", "demo", "--port", "0")
GATEWAY_ON = rb"gateway on (https?://127\.0\.0\.1:\d+)"


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (Z for a zombie), or None once it is reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


async def test_a_mock_killed_by_hand_is_reaped_at_once_and_logged(spawn: Spawn) -> None:
    demo = await spawn(*DEMO)
    await demo.wait_for(GATEWAY_ON)
    # The demo's own suggestion, word for word.
    pid = int((await demo.wait_for(rb"  kill -9 (\d+)\n")).group(1))
    assert _state(pid) not in (None, "Z")
    os.kill(pid, signal.SIGKILL)
    await demo.wait_for(rb"mock-1 \(pid %d\) exited \(killed by SIGKILL\)" % pid, timeout=5)
    # The line is logged after the wait reaped it: no zombie left in the process table.
    assert _state(pid) is None
    assert await demo.stop(signal.SIGINT) == 0
    assert b"Traceback" not in demo.output
    # Only the one that was killed is reported; the others were stopped by the demo.
    assert len(re.findall(rb"exited \(", demo.output)) == 1


async def test_a_busy_port_is_named_with_the_flag_to_change_it(spawn: Spawn) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = await spawn(sys.executable, "-m", "ntonix.cli", "demo", "--port", str(port))
        with trio.fail_after(30):
            status = await demo.process.wait()
    await demo.wait_for(rb"port is in use")  # the rest of the output
    assert status == 1
    assert f"ntonix: demo cannot listen on 127.0.0.1:{port}".encode() in demo.output
    assert b"--port" in demo.output
    assert b"Traceback" not in demo.output
    # The mocks it had started went with it.
    assert b"exited (" not in demo.output


def _printed_curl(output: bytes) -> str:
    """The demo's 'Try a streaming chat completion' command, continuation lines joined."""
    block = output.decode().split("Try a streaming chat completion:\n", 1)[1].split("\n\n")[0]
    return block.replace("\\\n", " ")


async def test_tls_demo_serves_https_and_its_curl_line_works(spawn: Spawn) -> None:
    demo = await spawn(*DEMO, "--tls")
    url = (await demo.wait_for(GATEWAY_ON)).group(1).decode()
    assert url.startswith("https://")
    curl = _printed_curl(demo.output)
    ca = trio.Path(re.search(r"--cacert (\S+)", curl).group(1))  # type: ignore[union-attr]
    assert await ca.is_file()
    answer = await trio.run_process(["bash", "-c", curl], capture_stdout=True, check=False)
    assert answer.returncode == 0, answer
    assert answer.stdout.endswith(b"data: [DONE]\n\n")
    # Without the CA the certificate is refused: the CA is the one the demo made.
    refused = await trio.run_process(
        ["bash", "-c", curl.replace(f"--cacert {ca}", "")],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert refused.returncode == 60  # curl: peer certificate cannot be authenticated
    assert await demo.stop(signal.SIGINT) == 0
    assert not await ca.parent.exists()  # throw-away: gone with the demo


async def test_tls_demo_without_trustme_says_what_to_install(spawn: Spawn) -> None:
    # As an install without the demo extra: `import trustme` fails.
    without_trustme = "import sys; sys.modules['trustme'] = None; from ntonix.cli import main; "
    demo = await spawn(
        sys.executable, "-c", without_trustme + "sys.exit(main(['demo', '--tls', '--port', '0']))"
    )
    with trio.fail_after(30):
        assert await demo.process.wait() == 1
    await demo.wait_for(rb"ntonix: demo --tls needs trustme: pip install 'ntonix\[demo\]'\n")
    assert b"gateway on" not in demo.output
