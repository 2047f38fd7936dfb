"""`python -m tests.chaos.census serve ...`: `ntonix serve` that also tells its Trio task count.

The chaos tests must see that a fault leaves no task behind, and the gateway exposes no task
count. So this runs the real `ntonix serve` command (`ntonix.cli.main`), with one wrapper
around each worker's `serve_worker`: a unix socket at `$NTONIX_CENSUS/<pid>.sock` that answers
every connection with one JSON line, `{"tasks": N}` (the census's own listener and handler
included: a constant). With `--workers N`, multiprocessing's spawn imports this module in each
worker as `__mp_main__`, which installs the same wrapper there.

`$NTONIX_SEND_TIMEOUT` (seconds), when set, replaces the listening sockets' TCP_USER_TIMEOUT
(30 s in `ntonix serve`): the client faults need a gateway that gives up on them in seconds.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from typing import Any

import trio

import ntonix.server
from ntonix.listening import set_send_timeout

_serve_worker = ntonix.server.serve_worker


def task_count() -> int:
    """Every task of this Trio run, the root task included."""
    count = 0
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


async def _answer(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.send_all(json.dumps({"tasks": task_count()}).encode() + b"\n")


async def _census(path: str, task_status: trio.TaskStatus[None]) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    try:
        await trio.serve_listeners(_answer, [trio.SocketListener(sock)], task_status=task_status)
    finally:
        os.unlink(path)


async def _counted_serve_worker(*args: Any, **kwargs: Any) -> None:
    sockets = args[2]
    timeout = os.environ.get("NTONIX_SEND_TIMEOUT")
    if timeout:
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            set_send_timeout(sock, float(timeout))
    path = os.path.join(os.environ["NTONIX_CENSUS"], f"{os.getpid()}.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(_census, path))
        await _serve_worker(*args, **kwargs)
        nursery.cancel_scope.cancel()


def install() -> None:
    ntonix.server.serve_worker = _counted_serve_worker  # type: ignore[assignment]


if __name__ in {"__main__", "__mp_main__"}:
    install()

if __name__ == "__main__":
    from ntonix.cli import main

    sys.exit(main(sys.argv[1:]))
