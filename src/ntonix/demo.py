"""`ntonix demo`: mock LLM backends as child processes and a gateway in front of them.

The mocks are processes of their own so that a user can kill one (and start it again on the
same port) and watch the gateway fail over, eject it and take it back.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from ntonix.config import BackendSettings, Config, HealthSettings
from ntonix.server import serve, wait_for_stop_signal

_LISTENING = re.compile(rb"listening on (http://\S+)")
# Probe often, eject briefly: a killed mock leaves and comes back within seconds.
DEMO_HEALTH = HealthSettings(interval=1.0, timeout=1.0, open_for=2.0, max_open_for=10.0)


@attrs.frozen
class MockProcess:
    name: str
    url: str
    process: trio.Process


async def _start_mock(name: str) -> MockProcess:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mocks.llm", "--port", "0", "--name", name],
        stdout=subprocess.PIPE,
        # A Ctrl-C in the terminal is the demo's to handle: the mocks stop when it says so.
        start_new_session=True,
    )
    assert process.stdout is not None
    output = b""
    with trio.fail_after(30):
        while not (match := _LISTENING.search(output)):
            data = await process.stdout.receive_some(4096)
            if not data:
                raise RuntimeError(f"mock {name} exited before listening: {output.decode()}")
            output += data
    return MockProcess(name, match.group(1).decode(), process)


@asynccontextmanager
async def mock_processes(count: int) -> AsyncIterator[list[MockProcess]]:
    """`count` mock backends; each is stopped (SIGTERM, then SIGKILL) on the way out."""
    mocks: list[MockProcess] = []
    try:
        for index in range(1, count + 1):
            mocks.append(await _start_mock(f"mock-{index}"))
        yield mocks
    finally:
        with trio.CancelScope(shield=True):
            for mock in mocks:
                if mock.process.returncode is None:
                    mock.process.send_signal(signal.SIGTERM)
            for mock in mocks:
                with trio.move_on_after(5) as waiting:
                    await mock.process.wait()
                if waiting.cancelled_caught:
                    mock.process.kill()


async def run_demo(
    backends: int,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mock backends plus a gateway in front of them, until SIGINT/SIGTERM."""
    async with mock_processes(backends) as mocks:
        settings = tuple(BackendSettings(name=m.name, url=m.url) for m in mocks)
        config = Config(backends=settings, health=DEMO_HEALTH)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            run = partial(serve, config, [f"127.0.0.1:{port}"], shutdown_trigger=stop.wait)
            gateway_url = (await nursery.start(run))[0]
            print(instructions(gateway_url, mocks), flush=True)
            task_status.started(gateway_url)
            await wait_for_stop_signal()
            stop.set()  # the gateway drains its streams; the mocks serve them until it is done
    print("ntonix demo: stopped", flush=True)


def instructions(gateway_url: str, mocks: Sequence[MockProcess]) -> str:
    listing = "\n".join(f"  {m.name}: {m.url} (pid {m.process.pid})" for m in mocks)
    first = mocks[0]
    restart = (
        f"{os.path.basename(sys.executable)} -m mocks.llm --port {first.url.rsplit(':', 1)[1]}"
    )
    return f"""NTONIX demo: gateway on {gateway_url} in front of {len(mocks)} mock LLM backends:
{listing}

Try a streaming chat completion:
  curl -N {gateway_url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "mock-llm", "stream": true,
         "messages": [{{"role": "user", "content": "Hello"}}]}}'

With the OpenAI SDK (pip install openai):
  python -c 'from openai import OpenAI
c = OpenAI(base_url="{gateway_url}/v1", api_key="unused")
for ch in c.chat.completions.create(model="mock-llm", stream=True,
        messages=[{{"role": "user", "content": "Hello"}}]):
    print(ch.choices[0].delta.content or "", end="", flush=True)'

Live dashboard: {gateway_url}/ntonix/dashboard
Gateway status: ntonix status --url {gateway_url}  (or curl {gateway_url}/ntonix/status)
Kill a backend and watch it leave and come back:
  kill -9 {first.process.pid}
  {restart} --name {first.name}
Press Ctrl-C to stop."""
