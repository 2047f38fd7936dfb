"""The ASGI application: the lifespan owns the supervisor nursery; requests are routed here."""

from __future__ import annotations

import os
import sys
import time

import attrs
import hypercorn.config
import trio

from ntonix import __version__
from ntonix.asgi import Receive, Scope, Send, send_json
from ntonix.config import Config, ConfigError, load_config
from ntonix.core.requests import is_proxied
from ntonix.errors import GatewayError, client_error
from ntonix.proxy import Proxy
from ntonix.upstream import pools_for

# Methods that make no sense through an LLM gateway and that proxies are abused with.
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})


class Gateway:
    """NTONIX as an ASGI app. Serve it with Hypercorn's trio worker."""

    def __init__(self, config: Config | None = None) -> None:
        """With no config, the config is loaded when the server starts (see `load_config`)."""
        self._config = config
        self.proxy: Proxy | None = None
        self._started_at = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            proxy = self.proxy
            if proxy is not None and is_proxied(scope["raw_path"]):
                if scope["method"] in _REFUSED_METHODS:
                    await _send_error(
                        send, client_error(405, "method_not_allowed", "Method not allowed")
                    )
                    return
                await proxy.handle(scope, receive, send)
            else:
                await self._own_route(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await send({"type": "websocket.close", "code": 1000})

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = config_for_hypercorn_command()
        return self._config

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            pools = pools_for(self.config.backends)
        except (OSError, ValueError) as error:
            await send({"type": "lifespan.startup.failed", "message": f"Cannot start: {error}"})
            return
        # The supervisor: long-lived tasks (probes, the cache writer) live here, and it outlives
        # every request, because Hypercorn drains requests before it sends lifespan.shutdown.
        async with trio.open_nursery() as supervisor:
            self.proxy = Proxy(self.config, pools)
            self._started_at = time.monotonic()
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            supervisor.cancel_scope.cancel()
        for pool in pools.values():
            pool.close()
        await send({"type": "lifespan.shutdown.complete"})

    async def _own_route(self, scope: Scope, send: Send) -> None:
        path = scope["raw_path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _send_error(
                send, client_error(404, "unknown_route", f"Unknown route: {scope['path']}")
            )
        elif path == b"/ntonix/health":
            await send_json(send, 200, {"status": "ok"})
        elif path == b"/ntonix/ready":
            ready = self.proxy is not None
            await send_json(send, 200 if ready else 503, {"ready": ready})
        elif path == b"/ntonix/status":
            await send_json(send, 200, self.status())
        else:
            await _send_error(
                send, client_error(404, "unknown_route", f"Unknown route: {scope['path']}")
            )

    def status(self) -> dict[str, object]:
        pools = self.proxy.pools if self.proxy is not None else {}
        backends = []
        for backend in self.config.backends:
            pool = pools.get(backend.name)
            stats = pool.statistics() if pool is not None else None
            backends.append(
                {
                    "name": backend.name,
                    "url": backend.url,
                    "weight": backend.weight,
                    "state": "closed",
                    "consecutive_failures": 0,
                    "active_requests": stats.in_use if stats else 0,
                    "pool": attrs.asdict(stats) if stats else None,
                }
            )
        return {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started_at, 3),
            "backends": backends,
        }


def config_for_hypercorn_command() -> Config:
    """The config of a gateway started as `hypercorn ... ntonix:app`.

    A bad config ends the worker process with one line per problem and exit code 1, which the
    hypercorn command passes on. Any exception would be printed as a traceback instead.
    """
    try:
        config = load_config()
    except ConfigError as error:
        sys.stderr.write(error.report())
        sys.stderr.flush()
        os._exit(1)
    # The hypercorn command reads this default when it shuts down, so that without an explicit
    # --graceful-timeout it drains for our graceful_timeout rather than cutting streams at 3 s.
    hypercorn.config.Config.graceful_timeout = config.gateway.graceful_timeout
    return config


async def _send_error(send: Send, error: GatewayError) -> None:
    await send_json(send, error.status, error.payload(), error.headers()[1:])
