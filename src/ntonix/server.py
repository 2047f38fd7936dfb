"""Serving the gateway with Hypercorn's trio worker, in-process or as N worker processes."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import hypercorn.config
import hypercorn.run
import hypercorn.trio
import trio
from hypercorn.typing import Framework

from ntonix.app import Gateway
from ntonix.config import Config

# Pending connections the kernel queues for us: a burst of a thousand streams must not drop SYNs.
LISTEN_BACKLOG = 4096


def hypercorn_config(
    config: Config,
    binds: Sequence[str],
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> hypercorn.config.Config:
    settings = hypercorn.config.Config()
    settings.bind = list(binds)
    settings.worker_class = "trio"
    settings.backlog = LISTEN_BACKLOG
    # Hypercorn's default of 3 s would cut LLM streams in the middle on every restart.
    settings.graceful_timeout = config.gateway.graceful_timeout
    settings.accesslog = None
    # Hypercorn's own stderr handler would print every line twice next to ours.
    settings.errorlog = logging.getLogger("ntonix.server")
    if certfile:
        settings.certfile = certfile
        settings.keyfile = keyfile
    return settings


async def serve(
    config: Config,
    binds: Sequence[str] = ("127.0.0.1:8000",),
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    config_file: str | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_trigger` returns (default: SIGINT or SIGTERM), then drain for up
    to `graceful_timeout`.

    Reports the bound URLs (port 0 becomes the real port) through `task_status`.
    """
    settings = hypercorn_config(config, binds, certfile=certfile, keyfile=keyfile)
    await hypercorn.trio.serve(
        # Gateway speaks plain-dict ASGI; Hypercorn's TypedDict signature is stricter than needed.
        cast("Framework", Gateway(config, config_file=config_file)),
        settings,
        shutdown_trigger=shutdown_trigger or wait_for_stop_signal,
        task_status=task_status,
    )


async def wait_for_stop_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def serve_workers(
    config_path: str | None,
    config: Config,
    binds: Sequence[str],
    workers: int,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> int:
    """N worker processes on shared sockets, as the hypercorn command runs them."""
    settings = hypercorn_config(config, binds, certfile=certfile, keyfile=keyfile)
    settings.workers = workers
    settings.application_path = "ntonix:app"
    if config_path:
        os.environ["NTONIX_CONFIG"] = os.path.abspath(config_path)
    return hypercorn.run.run(settings)
