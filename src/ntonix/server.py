"""Serving the gateway with Hypercorn's trio worker, in-process or as N worker processes."""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import hypercorn.config
import hypercorn.run
import hypercorn.trio
import trio
from hypercorn.typing import Framework

from ntonix.app import Gateway
from ntonix.config import Config
from ntonix.tls import server_ssl_context

# Pending connections the kernel queues for us: a burst of a thousand streams must not drop SYNs.
LISTEN_BACKLOG = 4096
# How long a client may leave sent data unacknowledged (or its receive window shut) before the
# kernel aborts the connection. Hypercorn writes inside a shielded cancel scope and has no write
# timeout, so without this a client that stops reading pins its handler (and its upstream) for
# ever. Idle streams are not affected: the clock runs only while data waits to be delivered.
# 0 leaves the kernel's default (no such timeout).
CLIENT_SEND_TIMEOUT = 30.0

# The worker processes log as `ntonix.cli.main` sets up the parent's logging.
WORKER_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
}


class _Settings(hypercorn.config.Config):
    """Hypercorn's settings, plus the two things its own Config cannot express.

    Both Hypercorn paths go through these two methods: `worker_serve` (one worker, in-process)
    calls `create_sockets` and `create_ssl_context` itself, and `hypercorn.run.run` (N workers)
    creates the sockets in the parent and each worker builds its SSL context after unpickling
    this object. Overriding them is smaller than creating the sockets ourselves and handing
    them over (`worker_serve(sockets=...)` for one worker, `fd://` binds for N), and keeps the
    rest Hypercorn's: bind parsing (`unix:`, `fd://`, `[::1]:0`), SO_REUSEPORT for workers, the
    `Running on ...` line with the real port.
    """

    send_timeout: float = CLIENT_SEND_TIMEOUT

    def create_ssl_context(self) -> ssl.SSLContext | None:
        # Built here rather than handed in: an SSLContext cannot be pickled to the workers.
        if self.certfile is None or self.keyfile is None:
            return None
        return server_ssl_context(self.certfile, self.keyfile)

    def create_sockets(self) -> hypercorn.config.Sockets:
        sockets = super().create_sockets()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            _set_send_timeout(sock, self.send_timeout)
        return sockets


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """TCP_USER_TIMEOUT on a listening socket; the sockets it accepts inherit it (Linux)."""
    if sys.platform != "linux" or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a unix socket has no such timeout; other systems lack the option
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(seconds * 1000))


def hypercorn_config(
    config: Config,
    binds: Sequence[str],
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    send_timeout: float = CLIENT_SEND_TIMEOUT,
) -> hypercorn.config.Config:
    settings = _Settings()
    settings.send_timeout = send_timeout
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
    send_timeout: float = CLIENT_SEND_TIMEOUT,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_trigger` returns (default: SIGINT or SIGTERM), then drain for up
    to `graceful_timeout`.

    Reports the bound URLs (port 0 becomes the real port) through `task_status`.
    """
    settings = hypercorn_config(
        config, binds, certfile=certfile, keyfile=keyfile, send_timeout=send_timeout
    )
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
    # Workers are spawned, not forked: the parent's logging set-up does not reach them, and
    # without a handler their INFO lines (`Running on ...` among them) would vanish. Hypercorn
    # applies this in each worker when it creates its logger.
    settings.logconfig_dict = WORKER_LOGGING
    if config_path:
        os.environ["NTONIX_CONFIG"] = os.path.abspath(config_path)
    return hypercorn.run.run(settings)
