"""The workers of one `ntonix serve --workers N` show one gateway: whichever worker answers
/metrics, /ntonix/status or the dashboard answers with every worker's figures summed.

How: the parent makes a private directory for the run (mode 0700). Each worker listens there
on a unix socket and keeps its latest figures in a JSON file, both named after it. The worker
that answers writes its own figures, asks every other one (a line on its socket) to write its
own, waits for their "ok" up to `PEER_TIMEOUT`, then reads every file in the directory and
merges them (`ntonix.core.figures.merge`). Nothing of this is on the request path: a worker
copies its tallies and snapshots only when asked.

Invariants: a worker's file is replaced whole (written aside, then renamed) and only by that
worker, whose counters only grow, and every figure shown was in its worker's file first; so a
counter shown never goes backwards. A worker slow to answer is read from its last file; one
that stopped or died (its socket is gone or refuses) from its last file, gauges left out: its
counts stay in the sums, its in-flight requests do not. Counts a worker made after its last
write and before a SIGKILL are lost, never shown. A restarted worker is a new name.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from ntonix.core.figures import Figures, merge
from ntonix.core.figures_json import decode, encode

log = logging.getLogger("ntonix.gathering")

# How long the answering worker waits for the others to write their figures. One that is
# slower (a blocked event loop) is read from its last file.
PEER_TIMEOUT = 1.0
_ASK = b"figures\n"
_ASK_WITH_WINDOW = b"figures+window\n"
_OK = b"ok\n"
# A dead worker's socket file stays behind, and connecting to it is refused.
_GONE = (errno.ECONNREFUSED, errno.ENOENT)


class WorkerGroup:
    """This worker's place in the run's directory, and its view of the other workers."""

    def __init__(self, directory: str, *, peer_timeout: float = PEER_TIMEOUT) -> None:
        self.directory = Path(directory)
        self.peer_timeout = peer_timeout
        # The pid alone could come back: a restarted worker must not take a dead one's file.
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._file = self.directory / f"{self.name}.json"
        self._socket = self.directory / f"{self.name}.sock"

    def publish(self, figures: Figures) -> None:
        """Replace this worker's file with `figures`, whole."""
        aside = self._file.with_suffix(".tmp")
        aside.write_text(json.dumps(encode(figures)), encoding="utf-8")
        aside.replace(self._file)

    async def serve(
        self,
        figures: Callable[[bool], Figures],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write `figures(with_window)` whenever another worker asks, until cancelled; then
        the socket is removed, so that the others count this worker as gone."""
        self.publish(figures(False))
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(self._socket))
            sock.listen(64)
            listener = trio.SocketListener(sock)
            task_status.started()
            await trio.serve_listeners(partial(self._answer, figures=figures), [listener])
        finally:
            sock.close()
            self._socket.unlink(missing_ok=True)

    async def _answer(self, stream: trio.abc.Stream, figures: Callable[[bool], Figures]) -> None:
        # An error here would end serve_listeners, and with it this worker's part in the run.
        try:
            async with stream:
                with trio.fail_after(self.peer_timeout):
                    line = await stream.receive_some(64)
                    if line in (_ASK, _ASK_WITH_WINDOW):
                        self.publish(figures(line == _ASK_WITH_WINDOW))
                        await stream.send_all(_OK)
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as error:
            log.warning("a worker asked for figures and left early: %r", error)

    async def gather(self, own: Figures, *, window: bool = False) -> Figures:
        """The gateway's figures: `own` (this worker's, current) and every other worker's."""
        self.publish(own)
        others = sorted(path for path in self.directory.glob("*.json") if path != self._file)
        gone: set[str] = set()
        with trio.move_on_after(self.peer_timeout):
            async with trio.open_nursery() as nursery:
                for path in others:
                    nursery.start_soon(self._ask, path.stem, window, gone)
        live, stopped = [own], list[Figures]()
        for path in others:
            figures = _read(path)
            if figures is not None:
                (stopped if path.stem in gone else live).append(figures)
        return merge(live, stopped)

    async def _ask(self, name: str, window: bool, gone: set[str]) -> None:
        try:
            stream = await trio.open_unix_socket(str(self.directory / f"{name}.sock"))
        except OSError as error:
            if error.errno in _GONE:
                gone.add(name)
            return
        async with stream:
            try:
                await stream.send_all(_ASK_WITH_WINDOW if window else _ASK)
                await stream.receive_some(len(_OK))
            except (trio.BrokenResourceError, OSError):
                gone.add(name)  # it died while asked: its last file stands


def _read(path: Path) -> Figures | None:
    """A worker's last figures; None if its file vanished or cannot be read (logged)."""
    try:
        return decode(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.error("cannot read a worker's figures from %s: %r", path, error)
        return None
