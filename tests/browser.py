"""A minimal Chrome DevTools Protocol client: headless Chromium for the dashboard test.

Only what the tests need: open a page, evaluate JavaScript, take a screenshot. One websocket
to the browser; the page is a flattened session on it (Target.attachToTarget, flatten).
The browser this module starts is always stopped, its process group with it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
# A screenshot travels as one base64 message, well over trio-websocket's 1 MiB default.
MAX_MESSAGE = 64 * 1024 * 1024


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    for name in BROWSER_NAMES:
        if path := shutil.which(name):
            return path
    return None


class CDPError(Exception):
    """The browser answered a command with an error, or the page threw."""


class Page:
    """One tab, driven through its session on the browser's DevTools websocket."""

    def __init__(self, socket: WebSocketConnection, session: str, ids: itertools.count[int]):
        self._socket = socket
        self._session = session
        self._ids = ids

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await _call(self._socket, self._ids, method, params, self._session)

    async def navigate(self, url: str) -> None:
        """Start loading `url`; returns once the navigation is committed, not when loaded."""
        result = await self.call("Page.navigate", url=url)
        if "errorText" in result:
            raise CDPError(f"cannot open {url}: {result['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> None:
        """A PNG of the viewport, saved to `path` (its folder is created if need be)."""
        result = await self.call("Page.captureScreenshot", format="png")
        await trio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        await trio.Path(path).write_bytes(base64.b64decode(result["data"]))


async def _call(
    socket: WebSocketConnection,
    ids: itertools.count[int],
    method: str,
    params: dict[str, Any],
    session: str | None = None,
) -> dict[str, Any]:
    """Send one command and read until its answer. Commands go one at a time, so the events
    read on the way (none are enabled on purpose) can be dropped."""
    command: dict[str, Any] = {"id": next(ids), "method": method, "params": params}
    if session is not None:
        command["sessionId"] = session
    await socket.send_message(json.dumps(command))
    while True:
        message = json.loads(await socket.get_message())
        if message.get("id") == command["id"]:
            if "error" in message:
                raise CDPError(f"{method}: {message['error']}")
            result: dict[str, Any] = message["result"]
            return result


@asynccontextmanager
async def headless_chromium(
    binary: str, *, width: int = 1280, height: int = 800
) -> AsyncIterator[Page]:
    """A headless browser with one blank page of `width` x `height` CSS pixels."""
    with tempfile.TemporaryDirectory(prefix="ntonix-chromium-", ignore_cleanup_errors=True) as tmp:
        profile = Path(tmp)
        # A local file opened once before the browser starts: blocking for no time at all.
        with open(profile / "chromium.log", "wb") as log:  # noqa: ASYNC230
            process = await trio.lowlevel.open_process(
                [
                    binary,
                    "--headless=new",
                    "--no-sandbox",  # we run as root, where the sandbox refuses to start
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={profile}",
                    f"--window-size={width},{height}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own process group, so that stopping it reaches its renderers too.
                start_new_session=True,
            )
        try:
            endpoint = await _devtools_endpoint(process, profile)
            async with open_websocket_url(endpoint, max_message_size=MAX_MESSAGE) as socket:
                ids = itertools.count(1)
                target = await _call(socket, ids, "Target.createTarget", {"url": "about:blank"})
                attached = await _call(
                    socket,
                    ids,
                    "Target.attachToTarget",
                    {"targetId": target["targetId"], "flatten": True},
                )
                page = Page(socket, attached["sessionId"], ids)
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=width,
                    height=height,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                yield page
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process)


async def _devtools_endpoint(process: trio.Process, profile: Path) -> str:
    """The browser's websocket URL, from the file Chromium writes once it listens (port 0
    means it picked its own port)."""
    announced = profile / "DevToolsActivePort"
    while True:
        if process.returncode is not None:
            output = (profile / "chromium.log").read_text(errors="replace")
            raise RuntimeError(f"chromium exited {process.returncode}:\n{output}")
        lines = announced.read_text().split() if announced.exists() else []
        if len(lines) == 2:
            port, path = lines
            return f"ws://127.0.0.1:{port}{path}"
        await trio.sleep(0.05)


async def _stop(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL for whatever of its process group is left after 5 s."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(5):
            await process.wait()
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(process.pid, signal.SIGKILL)
    with trio.move_on_after(5):
        await process.wait()
