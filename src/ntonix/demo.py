"""`ntonix demo`: mock LLM backends as child processes and a gateway in front of them.

The mocks are processes of their own so that a user can kill one (and start it again on the
same port) and watch the gateway fail over, eject it and take it back. Each is waited for by a
task of its own, so one killed by hand is reaped (and logged) at once, not left a zombie.
With `--tls` the gateway serves HTTPS with a throw-away CA that lives in a temporary directory
for as long as the demo runs.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory

import attrs
import trio

from ntonix.config import BackendSettings, Config, HealthSettings
from ntonix.devcerts import DevCerts, write_dev_certs
from ntonix.server import serve, wait_for_stop_signal

log = logging.getLogger("ntonix.demo")
_LISTENING = re.compile(rb"listening on (http://\S+)")
# Probe often, eject briefly: a killed mock leaves and comes back within seconds.
DEMO_HEALTH = HealthSettings(interval=1.0, timeout=1.0, open_for=2.0, max_open_for=10.0)


def mock_module() -> str:
    """The mock backend's module: inside the package in an installed wheel (ntonix.mocks.llm),
    the top-level `mocks` of the source tree otherwise (an editable install, a checkout)."""
    package = "ntonix.mocks" if importlib.util.find_spec("ntonix.mocks") else "mocks"
    return f"{package}.llm"


# Each mock runs a queue of 8 slots and reports it as vLLM does, so that the dashboard shows
# the engines' load and least-loaded has something to read.
MOCK_OPTIONS = ("--engine", "vllm", "--slots", "8")


@attrs.frozen
class MockProcess:
    name: str
    url: str
    process: trio.Process


async def _start_mock(name: str) -> MockProcess:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", mock_module(), "--port", "0", "--name", name, *MOCK_OPTIONS],
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


async def _reap(mock: MockProcess) -> None:
    """Wait for a mock that exits before the demo does (killed by hand, say): reaped at once."""
    status = await mock.process.wait()
    how = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
    log.warning(
        "%s (pid %d) exited (%s); the gateway ejects it until it is back on %s",
        mock.name,
        mock.process.pid,
        how,
        mock.url,
    )


@asynccontextmanager
async def mock_processes(count: int) -> AsyncIterator[list[MockProcess]]:
    """`count` mock backends; each is stopped (SIGTERM, then SIGKILL) on the way out."""
    mocks: list[MockProcess] = []
    async with trio.open_nursery() as reapers:
        try:
            for index in range(1, count + 1):
                mocks.append(mock := await _start_mock(f"mock-{index}"))
                reapers.start_soon(_reap, mock)
            yield mocks
        finally:
            # The demo is stopping them now: their exits are not news.
            reapers.cancel_scope.cancel()
            await _stop(mocks)


async def _stop(mocks: Sequence[MockProcess]) -> None:
    with trio.CancelScope(shield=True):
        for mock in mocks:
            if mock.process.returncode is None:
                mock.process.send_signal(signal.SIGTERM)
        for mock in mocks:
            with trio.move_on_after(5) as waiting:
                await mock.process.wait()
            if waiting.cancelled_caught:
                mock.process.kill()


@contextmanager
def _throwaway_certs(tls: bool) -> Iterator[DevCerts | None]:
    """With `tls`, a fresh CA and server certificate, deleted when the demo ends."""
    if not tls:
        yield None
        return
    with TemporaryDirectory(prefix="ntonix-demo-") as scratch:
        yield write_dev_certs(Path(scratch))


async def run_demo(
    backends: int,
    port: int,
    *,
    tls: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mock backends plus a gateway in front of them, until SIGINT/SIGTERM."""
    with _throwaway_certs(tls) as certs:
        async with mock_processes(backends) as mocks:
            settings = tuple(BackendSettings(name=m.name, url=m.url) for m in mocks)
            config = Config(backends=settings, health=DEMO_HEALTH)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                run = partial(
                    serve,
                    config,
                    [f"127.0.0.1:{port}"],
                    certfile=str(certs.certfile) if certs else None,
                    keyfile=str(certs.keyfile) if certs else None,
                    shutdown_trigger=stop.wait,
                )
                gateway_url = (await nursery.start(run))[0]
                print(instructions(gateway_url, mocks, certs.ca if certs else None), flush=True)
                task_status.started(gateway_url)
                await wait_for_stop_signal()
                stop.set()  # the gateway drains its streams; the mocks serve them until then
    print("ntonix demo: stopped", flush=True)


def instructions(gateway_url: str, mocks: Sequence[MockProcess], ca: Path | None = None) -> str:
    """What to try, with `curl --cacert CA` and a verifying OpenAI client when TLS is on."""
    listing = "\n".join(f"  {m.name}: {m.url} (pid {m.process.pid})" for m in mocks)
    first = mocks[0]
    restart = f"{sys.executable} -m {mock_module()} --port {first.url.rsplit(':', 1)[1]}"
    curl = f"curl --cacert {ca}" if ca else "curl"
    # httpx (under the OpenAI SDK) reads SSL_CERT_FILE; it replaces the system CAs for that run.
    sdk_env = f"SSL_CERT_FILE={ca} " if ca else ""
    status_ca = f" --cacert {ca}" if ca else ""
    return f"""NTONIX demo: gateway on {gateway_url} in front of {len(mocks)} mock LLM backends:
{listing}

Try a streaming chat completion:
  {curl} -N {gateway_url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "mock-llm", "stream": true,
         "messages": [{{"role": "user", "content": "Hello"}}]}}'

With the OpenAI SDK (pip install openai):
  {sdk_env}python -c 'from openai import OpenAI
c = OpenAI(base_url="{gateway_url}/v1", api_key="unused")
for ch in c.chat.completions.create(model="mock-llm", stream=True,
        messages=[{{"role": "user", "content": "Hello"}}]):
    print(ch.choices[0].delta.content or "", end="", flush=True)'

Live dashboard: {gateway_url}/ntonix/dashboard
Gateway status: ntonix status --url {gateway_url}{status_ca}
  (or {curl} {gateway_url}/ntonix/status)
Kill a backend and watch it leave and come back:
  kill -9 {first.process.pid}
  {restart} --name {first.name} {" ".join(MOCK_OPTIONS)}
Press Ctrl-C to stop."""
