"""Running under the plain `hypercorn ... ntonix:app` command instead of `ntonix serve`.

Invariants this module owns:
- A worker of the hypercorn command reads its config once, at start (`load_config`); a bad
  config ends the worker with one line per problem and exit code 1, never a traceback.
- Hypercorn's defaults it reads are ours: the drain lasts `graceful_timeout`, a WebSocket
  message is capped at `max_message_size`, and its listening sockets get our send timeout.
- A SIGTERM to the worker reaches Hypercorn's parent, which drains every worker, rather than
  cutting the worker's streams at once.
"""

import multiprocessing
import os
import signal
import sys
from typing import cast

import hypercorn.config
import trio

from ntonix.announce import log_to_stderr_unless_configured
from ntonix.config import Config, ConfigError, load_config
from ntonix.listening import set_send_timeout_on_listening_sockets


def config_for_hypercorn_command() -> Config:
    """The config of a gateway started as `hypercorn ... ntonix:app`.

    A bad config ends the worker process with one line per problem and exit code 1. Any
    exception would be printed as a traceback instead.
    """
    log_to_stderr_unless_configured()
    try:
        config = load_config()
    except ConfigError as error:
        sys.stderr.write(error.report())
        sys.stderr.flush()
        os._exit(1)
    # The hypercorn command reads this default when it shuts down, so that without an explicit
    # --graceful-timeout it drains for our graceful_timeout rather than cutting streams at 3 s.
    hypercorn.config.Config.graceful_timeout = config.gateway.graceful_timeout
    websocket_settings(hypercorn.config.Config, config)
    # Hypercorn bound its listening sockets (in its parent, before spawning this worker)
    # without the send timeout `ntonix serve` sets on its own: set it on them here.
    set_send_timeout_on_listening_sockets()
    return config


async def drain_hypercorn_on_sigterm() -> None:
    """A worker of the plain hypercorn command passes SIGTERM on to Hypercorn's parent process.

    Hypercorn's workers keep SIGTERM's default action, so a SIGTERM to the whole process group
    (systemd's default, `kill 0`) would end them at once: streams cut, access-log lines lost.
    The parent drains every worker when it gets SIGTERM; telling it again is harmless. A single
    process (`--workers 0`), or one whose parent is gone, ends on SIGTERM as it always did.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    with trio.open_signal_receiver(signal.SIGTERM) as received:
        async for _ in received:
            if not parent.is_alive():
                break
            os.kill(cast(int, parent.pid), signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)


def websocket_settings(
    settings: type[hypercorn.config.Config] | hypercorn.config.Config, config: Config
) -> None:
    """Hypercorn reads each client message whole before the app sees it: its limit is ours.
    (Its own pings stay off: their task outlives the connection by up to one interval.)"""
    settings.websocket_max_message_size = config.websocket.max_message_size
