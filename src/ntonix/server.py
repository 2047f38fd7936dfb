"""Serving the gateway: one worker in-process, or N worker processes on shared sockets.

Both run `worker.serve_worker` (Hypercorn's HTTP machinery behind our capped listeners) on
sockets bound here, through Hypercorn's bind parsing. With N workers the parent binds, spawns
the workers, hands them the sockets and supervises them (`worker_supervisor.py`: signals passed
on, a dead worker replaced, a stop drains them all).

Invariants this module owns:
- Sockets are bound once, by the process that serves or by the parent of N workers, which keeps
  them open (to replace a worker that dies) until every worker has stopped accepting.
- Workers are spawned, never forked, and start with SIGINT, SIGTERM and SIGHUP ignored and
  blocked, until their event loop handles them: a signal meanwhile is held, not lost.
- The connection cap is one for the whole gateway: N workers count their connections in
  memory they share.
- An embedded valkey-server starts before the first worker and stops after the last drain.
"""

from __future__ import annotations

import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import shutil
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, MutableSequence, Sequence
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import cast

import hypercorn.config
import trio
from hypercorn.typing import AppWrapper, Framework
from hypercorn.utils import wrap_app

from ntonix import private_dirs
from ntonix.app import Gateway
from ntonix.config import Config
from ntonix.embedded import EmbeddedValkey
from ntonix.gathering import WorkerGroup
from ntonix.hypercorn_command import websocket_settings
from ntonix.listening import CLIENT_SEND_TIMEOUT, ConnectionSlots, set_send_timeout
from ntonix.tls import server_ssl_context
from ntonix.worker import serve_worker
from ntonix.worker_supervisor import RESTARTS, WORKER_SIGNALS, Supervisor

log = logging.getLogger("ntonix.server")

# Pending connections the kernel queues for us: a burst of a thousand streams must not drop SYNs.
LISTEN_BACKLOG = 4096

# The worker processes log as `ntonix.cli.main` sets up the parent's logging.
WORKER_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    # httpx logs every request at INFO: a line per health probe.
    "loggers": {"httpx": {"level": "WARNING"}},
}


class _Settings(hypercorn.config.Config):
    """Hypercorn's settings, plus the two things its own Config cannot express.

    Overriding `create_sockets` keeps Hypercorn's bind parsing (`unix:`, `fd://`, `[::1]:0`)
    and adds our send timeout. The SSL context is built in each worker from the file names:
    an SSLContext cannot be pickled to a spawned worker process, this object can.
    """

    send_timeout: float = CLIENT_SEND_TIMEOUT

    def create_ssl_context(self) -> ssl.SSLContext | None:
        if self.certfile is None or self.keyfile is None:
            return None
        return server_ssl_context(self.certfile, self.keyfile)

    def create_sockets(self) -> hypercorn.config.Sockets:
        sockets = super().create_sockets()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            set_send_timeout(sock, self.send_timeout)
        return sockets


def hypercorn_config(
    config: Config,
    binds: Sequence[str],
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    send_timeout: float = CLIENT_SEND_TIMEOUT,
) -> _Settings:
    settings = _Settings()
    settings.send_timeout = send_timeout
    settings.bind = list(binds)
    settings.worker_class = "trio"
    settings.backlog = LISTEN_BACKLOG
    # Hypercorn's default of 3 s would cut LLM streams in the middle on every restart.
    settings.graceful_timeout = config.gateway.graceful_timeout
    websocket_settings(settings, config)
    # Hypercorn's default of 60 s lets silent connections hold slots of max_connections.
    settings.ssl_handshake_timeout = config.gateway.handshake_timeout
    settings.accesslog = None
    # Hypercorn's own stderr handler would print every line twice next to ours.
    settings.errorlog = logging.getLogger("ntonix.server")
    if certfile:
        settings.certfile = certfile
        settings.keyfile = keyfile
    return settings


def listening_sockets(settings: hypercorn.config.Config) -> hypercorn.config.Sockets:
    """Bound and listening: a port in use fails here, before any worker starts."""
    sockets = settings.create_sockets()
    for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
        sock.listen(settings.backlog)
    return sockets


def _asgi(gateway: Gateway, settings: hypercorn.config.Config) -> AppWrapper:
    # Gateway speaks plain-dict ASGI; Hypercorn's TypedDict signature is stricter than needed.
    return wrap_app(cast("Framework", gateway), settings.wsgi_max_body_size, "asgi")


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

    Reports the bound URLs (port 0 becomes the real port) through `task_status`. With
    `[shared] url = "embedded"`, a private valkey-server runs until the drain is over.
    """
    settings = hypercorn_config(
        config, binds, certfile=certfile, keyfile=keyfile, send_timeout=send_timeout
    )
    embedded = None
    if config.shared.embedded:
        # Launched here, on the main thread (it dies with the thread that started it); the
        # wait for its socket, which may take a while, runs in a worker thread.
        embedded = EmbeddedValkey.launch(config.cache.max_bytes)
        await trio.to_thread.run_sync(embedded.wait_until_ready)
    try:
        gateway = Gateway(
            config, config_file=config_file, embedded_tier=embedded.url if embedded else None
        )
        await serve_worker(
            _asgi(gateway, settings),
            settings,
            listening_sockets(settings),
            _slots(config),
            send_timeout=settings.send_timeout,
            max_request_body=config.gateway.max_request_body,
            shutdown_trigger=_telling(gateway, shutdown_trigger or wait_for_stop_signal),
            task_status=task_status,
        )
    finally:
        if embedded is not None:
            embedded.stop()


def _slots(
    config: Config, *, counts: MutableSequence[int] | None = None, index: int = 0
) -> ConnectionSlots:
    gateway = config.gateway
    return ConnectionSlots(
        gateway.max_connections,
        per_client=gateway.max_connections_per_client,
        counts=counts,
        index=index,
    )


def _telling(
    gateway: Gateway, trigger: Callable[[], Awaitable[object]]
) -> Callable[[], Awaitable[None]]:
    """`trigger`, then the gateway is told that the server stops accepting and drains."""

    async def wait() -> None:
        await trigger()
        gateway.stopping.set()

    return wait


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
    """N worker processes on shared sockets, holding max_connections client connections in
    all. Returns the exit code: 0 after a stop, 1 if a worker kept dying."""
    settings = hypercorn_config(config, binds, certfile=certfile, keyfile=keyfile)
    try:
        sockets = listening_sockets(settings)
    except OSError as error:
        print(f"ntonix: cannot serve on {', '.join(binds)}: {error}", file=sys.stderr)
        return 1
    embedded = None
    if config.shared.embedded:
        # One server for all the workers, started before them and stopped after their drain.
        try:
            embedded = EmbeddedValkey.start(config.cache.max_bytes)
        except OSError as error:
            print(f"ntonix: {error}", file=sys.stderr)
            return 1
    try:
        tier = embedded.url if embedded else None
        return _spawn_and_supervise(settings, sockets, config_path, config, workers, tier)
    finally:
        if embedded is not None:
            embedded.stop()


def _spawn_and_supervise(
    settings: _Settings,
    sockets: hypercorn.config.Sockets,
    config_path: str | None,
    config: Config,
    workers: int,
    embedded_tier: str | None,
) -> int:
    # Spawned, not forked: a fork would copy whatever state and threads the parent holds.
    spawn = multiprocessing.get_context("spawn")
    stop_reader, stop_writer = spawn.Pipe(duplex=False)
    # Each worker's count of open connections, in memory they all see: the cap is the total.
    counts = spawn.RawArray("q", workers)
    # Where the workers' figures meet, so that each answers for the whole gateway: private to
    # this run (mode 0700), removed after it (or by the next start, if this one is killed).
    figures = private_dirs.make("ntonix-workers-")
    work = (settings, sockets, config, config_path, counts, stop_reader, figures, embedded_tier)

    def start(index: int) -> BaseProcess:
        # The dead worker's connections died with it.
        counts[index] = 0
        process = spawn.Process(
            target=_worker_process, args=(*work, index), name=f"ntonix-worker-{index}"
        )
        # A worker starts with these signals ignored (an ignored disposition survives the
        # spawn's exec, a handler would not) until its event loop handles them, so that a
        # Ctrl-C while it is still importing prints no traceback and a SIGHUP does not kill it.
        # Blocked meanwhile here: one that arrives is held for our handler, not ignored (Linux
        # never discards a blocked signal); the worker unblocks them first thing.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in WORKER_SIGNALS}
        try:
            process.start()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return process

    def stop_listening() -> None:
        # The workers hold their own copies. Once they have all stopped accepting, a client
        # trying to connect is refused, rather than left in a backlog nobody reads.
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            sock.close()

    # `Supervisor` handles them; until then, while the first workers start, they are ignored.
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in WORKER_SIGNALS}
    try:
        processes = {index: start(index) for index in range(workers)}
        maximum = config.gateway.max_connections
        log.info("%d workers: %d client connections at most in all", workers, maximum)
        supervisor = Supervisor(start, stop_writer, settings.graceful_timeout, RESTARTS)
        return supervisor.run(processes, stop_listening)
    finally:
        stop_listening()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(figures, ignore_errors=True)


def _worker_process(
    settings: _Settings,
    sockets: hypercorn.config.Sockets,
    config: Config,
    config_file: str | None,
    counts: MutableSequence[int],
    stop: Connection,
    figures: str,
    embedded_tier: str | None,
    index: int,
) -> None:
    """One spawned worker. Its SIGINT, SIGTERM and SIGHUP start ignored (and blocked, if it
    replaces one that died); it handles them once it serves (SIGHUP through the gateway's
    reloader)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
    # Spawned, so the parent's logging set-up did not come along.
    logging.config.dictConfig(WORKER_LOGGING)
    gateway = Gateway(
        config,
        config_file=config_file,
        workers=WorkerGroup(figures),
        announce=index == 0,
        embedded_tier=embedded_tier,
    )
    # The parent closes the pipe to stop every worker (and the kernel does it if the parent
    # dies); a Ctrl-C in a terminal reaches the workers too.
    until_stopped = partial(
        _first_of, partial(trio.lowlevel.wait_readable, stop), wait_for_stop_signal
    )
    trio.run(
        partial(
            serve_worker,
            _asgi(gateway, settings),
            settings,
            sockets,
            _slots(config, counts=counts, index=index),
            send_timeout=settings.send_timeout,
            max_request_body=config.gateway.max_request_body,
            shutdown_trigger=_telling(gateway, until_stopped),
        )
    )


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return when the first of `waits` returns."""
    async with trio.open_nursery() as nursery:

        async def wait_then_stop(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(wait_then_stop, wait)
