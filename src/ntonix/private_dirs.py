"""Private temporary directories of one `ntonix serve`, and sweeping up after a killed one.

`ntonix serve` makes two kinds: its workers' shared figures (`ntonix-workers-*`) and the
embedded valkey-server's socket directory (`ntonix-valkey-*`). It removes them on the way out,
but a SIGKILL leaves them behind. So each names its owner's pid in `owner.pid`, and the next
start of either kind removes those whose owner no longer runs: a process that is gone owns
nothing. A directory without a readable owner file (another user's, one being made, not one of
ours) is left alone; so is one whose pid was reused by a live process, which is harmless.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile

log = logging.getLogger("ntonix.server")

OWNER_FILE = "owner.pid"  # the pid of the `ntonix serve` that made the directory


def make(prefix: str) -> str:
    """A new private directory (mode 0700) owned by this process, after sweeping up the
    directories of the same prefix that killed owners left."""
    remove_orphans(prefix)
    directory = tempfile.mkdtemp(prefix=prefix)
    with open(os.path.join(directory, OWNER_FILE), "w", encoding="ascii") as owner:
        owner.write(f"{os.getpid()}\n")
    return directory


def remove_orphans(prefix: str) -> None:
    """Remove the directories of this prefix whose owner no longer runs."""
    for directory in glob.glob(os.path.join(tempfile.gettempdir(), prefix + "*")):
        try:
            with open(os.path.join(directory, OWNER_FILE), encoding="ascii") as owner:
                pid = int(owner.read())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
            log.info("removed %s, left by an ntonix serve (pid %d) that was killed", directory, pid)
        except (OSError, ValueError):
            continue
