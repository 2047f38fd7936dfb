"""Serving a mock backend on a socket, through Hypercorn's trio worker or the lean server."""

from functools import partial

import hypercorn.trio
import trio
from hypercorn.config import Config

from ntonix import hypercorn_ws

from .backend import MockLLM
from .lean import serve_lean


def _hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.loglevel = "WARNING"  # no "Running on ..." line: the command prints its own
    return config


async def serve_mock(
    mock: MockLLM,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    lean: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `mock` on host:port (0 picks a free port) until cancelled; report the bound port."""
    if lean:
        await serve_lean(mock, host=host, port=port, task_status=task_status)
        return
    # Hypercorn then tells /v1/realtime the close code the gateway sent, not always 1006.
    hypercorn_ws.install()
    async with trio.open_nursery() as nursery:
        serve = partial(hypercorn.trio.serve, mock, _hypercorn_config(host, port), mode="asgi")
        binds: list[str] = await nursery.start(serve)
        # Hypercorn reports its binds as URLs, "http://127.0.0.1:40123".
        task_status.started(int(binds[0].rpartition(":")[2]))
