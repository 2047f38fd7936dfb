"""The ASGI application: the lifespan owns the supervisor nursery; requests are routed here."""

from __future__ import annotations

import hmac
import logging
import multiprocessing
import os
import signal
import sys
import time
import urllib.parse
from typing import cast

import attrs
import hypercorn.config
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from ntonix import dashboard, hypercorn_ws, overview
from ntonix.accesslog import AccessLog, open_target
from ntonix.accounts import Accounts
from ntonix.announce import log_circuit_change, log_start, log_to_stderr_unless_configured
from ntonix.asgi import Receive, Scope, Send, header, send_body, send_json
from ntonix.cache import ResponseCache
from ntonix.config import Config, ConfigError, config_path, load_config
from ntonix.core.auth import ApiKeys, digest, keys_from_file
from ntonix.core.breaker import BreakerSettings
from ntonix.core.figures import Figures, merge
from ntonix.core.headers import request_id_of
from ntonix.core.health import HealthTable
from ntonix.core.hygiene import check_request
from ntonix.core.limits import ClientLimits, Verdict
from ntonix.core.requests import is_proxied, method_error, path_error
from ntonix.core.sessions import SessionTallies
from ntonix.core.telemetry import RecentWindow, RequestRecord, Tallies
from ntonix.core.tenants import Tenant
from ntonix.core.token_limits import ratelimit_headers
from ntonix.downstream import new_request_id
from ntonix.errors import Dialect, GatewayError, client_error, dialect_of
from ntonix.gathering import WorkerGroup
from ntonix.listening import set_send_timeout_on_listening_sockets
from ntonix.load_reader import LoadReaders
from ntonix.metrics import exposition
from ntonix.prober import Probers
from ntonix.proxy import Proxy
from ntonix.shared_cache import SharedCache
from ntonix.shared_flights import SharedFlights
from ntonix.shared_limits import KeyLimits, Ticket
from ntonix.shared_tokens import SharedTokens
from ntonix.tier import SharedTier, TierUnavailable
from ntonix.upstream import BackendPool, backend_ssl_context
from ntonix.websocket_proxy import Sessions

log = logging.getLogger("ntonix")

# Gateway routes anyone may call, even when an admin token is set: load balancers poll them.
_OPEN_ROUTES = frozenset({b"/ntonix/health", b"/ntonix/ready"})


class Gateway:
    """NTONIX as an ASGI app. Serve it with Hypercorn's trio worker."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        config_file: str | None = None,
        workers: WorkerGroup | None = None,
        announce: bool = True,
        embedded_tier: str | None = None,
    ) -> None:
        """With no config, it is loaded when the server starts (see `load_config`);
        `config_file` is what SIGHUP and POST /ntonix/reload re-read; `workers` makes this
        one of N worker processes that show one gateway (ntonix.gathering). `announce` logs the
        setup at start (one worker of N says it for all). `embedded_tier` is the socket URL of
        the valkey-server `ntonix serve` runs for `[shared] url = "embedded"`."""
        self._config = config
        self._config_file = config_file
        self._workers = workers
        self._announce = announce
        self._embedded_tier = embedded_tier
        # Built without a config: `ntonix:app` under the plain hypercorn command.
        self._hypercorn_command = config is None
        self.proxy: Proxy | None = None
        self.sessions: Sessions | None = None
        self.session_tallies = SessionTallies()
        # A proxied session passes on the code and reason of the client's close frame.
        hypercorn_ws.install()
        self._probers: Probers | None = None
        self._load_readers: LoadReaders | None = None
        self._keys = ApiKeys(())
        # Each tenant brings its own numbers (ApiKeys gives plain keys [auth]'s).
        self._limits = KeyLimits(ClientLimits(per_minute=0, max_concurrent=0))
        self.tier: SharedTier | None = None
        self._started_at = time.monotonic()
        self.tallies = Tallies()
        self.accounts = Accounts()
        self.recent = RecentWindow()
        self.access_log = AccessLog("off")
        # Set when the server stops accepting (`ntonix serve` says so; the plain hypercorn
        # command cannot): open dashboards then close, rather than hold up the drain.
        self.stopping = trio.Event()

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config_file = config_path()
            self._config = config_for_hypercorn_command()
        return self._config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            proxy = self.proxy
            api = is_proxied(scope["raw_path"])
            record = self._begin(scope, api=api)
            try:
                refused = check_request(scope["method"], scope["raw_path"], scope["headers"])
                if refused is not None:
                    close = scope["http_version"].startswith("1")
                    await refuse(send, record, refused, close=close)
                elif (bad_path := path_error(scope["raw_path"])) is not None:
                    await refuse(send, record, bad_path)  # the same 400 for every route
                elif proxy is not None and api:
                    await self._client_request(scope, receive, send, proxy, record)
                else:
                    await self._own_route(scope, recording(send, record), record)
            finally:
                self._finish(record, api=api)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif self.sessions is not None and is_proxied(scope["raw_path"]):
            await self.sessions.serve(scope, receive, send)
        elif scope["path"] == "/ntonix/dashboard/ws" and self._admin_allowed(scope):
            await dashboard.stream_snapshots(receive, send, self.live_status, self.stopping)
        else:
            # Closing before accepting makes the server refuse the handshake (HTTP 403).
            await send({"type": "websocket.close", "code": 1008})

    def _begin(self, scope: Scope, *, api: bool) -> RequestRecord:
        client = scope.get("client")
        record = RequestRecord(
            started=trio.current_time(),
            wall_time=time.time(),
            request_id=request_id_of(scope["headers"]) or new_request_id(),
            client=client[0] if client else "unknown",
            method=scope["method"],
            path=scope["path"],
            cache=("bypass" if self.proxy is not None and self.proxy.cache else "off")
            if api
            else "",
        )
        if api:
            self.tallies.begin()
        return record

    def _finish(self, record: RequestRecord, *, api: bool) -> None:
        """Count and log a request that has ended; only API traffic feeds the metrics and the
        dashboard (a load balancer polling /ntonix/health is not traffic)."""
        now = trio.current_time()
        if api:
            self.tallies.finish(record, now)
            self.recent.add(now, record.backend, record.ttft())
        self.access_log.write(record, now)

    async def _client_request(
        self, scope: Scope, receive: Receive, send: Send, proxy: Proxy, record: RequestRecord
    ) -> None:
        """Who is asking (API key), within their limits, then the model list or the proxy."""
        ticket = await self._admit_client(scope, record)
        if isinstance(ticket, GatewayError):
            await refuse(send, record, ticket)
            return
        try:
            if (wrong := method_error(scope["method"], scope["raw_path"])) is not None:
                await refuse(send, record, wrong)
            elif scope["method"] in ("GET", "HEAD") and scope["raw_path"] in _MODEL_LISTS:
                await self._list_models(scope["raw_path"], recording(send, record), record)
            else:
                await proxy.handle(scope, receive, send, record)
        finally:
            self._release_client(ticket)

    async def _admit_client(
        self, scope: Scope, record: RequestRecord | None = None
    ) -> Ticket | GatewayError:
        """Who is asking (a named key's tenant, else "anonymous" by plain key or address), or
        the 401 or 429 that refuses them. Whoever is admitted holds a ticket (where their
        request was counted: the shared tier or this worker), released when their request or
        session ends. `record`, when given, learns the tenant and its x-ratelimit-* headers."""
        keys = self._keys
        if keys.required:
            tenant = keys.identify(header(scope, b"authorization"))
            if tenant is None:
                return client_error(401, "invalid_api_key", "Missing or invalid API key")
        else:
            tenant = keys.anonymous(scope["client"][0] if scope.get("client") else "unknown")
        # Tokens are charged when responses end: a key may start one while under its limits.
        tokens = await self.accounts.standing(tenant) if tenant.counts_tokens else None
        if tokens is not None and not tokens.allowed:
            verdict = Verdict(False, tokens.retry_after, tokens.reason)
            remaining = await self._limits.remaining(tenant, trio.current_time())
            ticket = Ticket(tenant, remaining=remaining)
        else:
            verdict, ticket = await self._limits.admit(tenant, trio.current_time())
        if record is not None:
            record.tenant = tenant
            if tenant.rate_limited:
                requests = None
                if ticket.remaining is not None:
                    requests = (tenant.requests_per_minute, *ticket.remaining)
                record.extra_headers = ratelimit_headers(requests, tokens)
        if not verdict.allowed:
            return GatewayError(
                429,
                "rate_limit_exceeded",
                f"Too many requests: {verdict.reason}",
                source="client",
                retry_after=verdict.retry_after,
            )
        return ticket

    def _release_client(self, ticket: Ticket) -> None:
        self._limits.release(ticket)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        config = self.config
        try:
            pools = {b.name: BackendPool(b, backend_ssl_context(b)) for b in config.backends}
            for backend in config.backends:
                if backend.scheme == "https" and not backend.tls_verify:
                    log.warning(
                        "backend %s: tls_verify = false, its certificate is NOT checked",
                        backend.name,
                    )
            self._keys = api_keys(config)
            self.access_log = AccessLog(config.log.access_log)
            self.tier = tier_for(config, self._embedded_tier)
        except (OSError, ValueError) as error:
            await send({"type": "lifespan.startup.failed", "message": f"Cannot start: {error}"})
            return
        health = HealthTable(
            config.backends, _breaker_settings(config), on_change=log_circuit_change
        )
        if self._announce:
            log_start(config, self._config_file)
        # The supervisor: long-lived tasks live here, and it outlives every request, because
        # Hypercorn drains requests before it sends lifespan.shutdown.
        async with trio.open_nursery() as supervisor:
            tier = self.tier
            if tier is not None:
                await tier.connect()
                # Within the tier's budget: a server that answers later is asked by the prober.
                if await tier.refuses_cluster():
                    message = f"Cannot start: {tier.refused}"
                    await send({"type": "lifespan.startup.failed", "message": message})
                    return
                supervisor.start_soon(tier.probe_forever)
            shared = None
            if tier is not None and config.cache.enabled:
                flights = SharedFlights(tier, config.shared.lease)
                shared = SharedCache(tier, config.cache.ttl, flights)
                supervisor.start_soon(flights.publish_forever)
                supervisor.start_soon(flights.read_forever)
                supervisor.start_soon(shared.store_forever)
            cache = (
                ResponseCache(config.cache, supervisor, shared) if config.cache.enabled else None
            )
            if cache is not None:
                supervisor.start_soon(cache.write_forever)
            self.proxy = Proxy(config, pools, health, cache, self.tallies, self.accounts)
            supervisor.start_soon(self.proxy.idle_watch.run)
            self.sessions = Sessions(
                self.proxy,
                admit_client=self._admit_client,
                release_client=self._release_client,
                tallies=self.session_tallies,
                access_log=self.access_log,
                stopping=self.stopping,
            )
            supervisor.start_soon(self.access_log.flush_forever)
            self._limits = KeyLimits(
                ClientLimits(per_minute=0, max_concurrent=0), tier, supervisor, config.shared.lease
            )
            if tier is not None:
                supervisor.start_soon(self._limits.renew_forever)
                self.accounts.shared = SharedTokens(tier, supervisor)
            self._probers = Probers(supervisor, health, config.health)
            self._probers.reconcile(config.backends, config.health)
            self._load_readers = LoadReaders(supervisor, health, self.proxy.loads, config.health)
            self._load_readers.reconcile(config.backends, config.health)
            supervisor.start_soon(self._reload_on_sighup)
            if self._workers is not None:
                await supervisor.start(self._workers.serve, self._own_figures)
            if self._hypercorn_command:
                supervisor.start_soon(_drain_hypercorn_on_sigterm)
            self._started_at = time.monotonic()
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            supervisor.cancel_scope.cancel()
        if self._workers is not None:
            # Every request has ended: the other workers keep these counts in their sums.
            self._workers.publish(self._own_figures(False))
        if self.tier is not None:
            await self.tier.aclose()
        for pool in self.proxy.pools.values():
            pool.retire()
        await self.access_log.close()
        await send({"type": "lifespan.shutdown.complete"})

    async def _reload_on_sighup(self) -> None:
        try:
            signals = trio.open_signal_receiver(signal.SIGHUP)
        except (RuntimeError, ValueError):  # not the main thread: no signals here
            return
        with signals as received:
            async for _ in received:
                self.reload()

    def reload(self) -> list[str]:
        """Re-read the config file without downtime; the problems if it was refused.

        Backends are added, removed (their streams finish) or re-weighted; an invalid config
        is logged and the running one stays.
        """
        proxy, probers = self.proxy, self._probers
        if self._config_file is None or proxy is None or probers is None:
            return ["no config file to reload: the gateway runs on the built-in default"]
        try:
            config = Config.from_file(self._config_file)
            keys = api_keys(config)
        except ConfigError as error:
            log.error("config reload refused, keeping the running config:\n%s", error.report())
            return error.problems
        except OSError as error:
            problem = f"auth.api_keys_file: cannot read it: {error}"
            log.error("config reload refused, keeping the running config: %s", problem)
            return [problem]
        try:
            access_file = open_target(config.log.access_log)
        except OSError as error:
            problem = f"log.access_log: cannot open it: {error}"
            log.error("config reload refused, keeping the running config: %s", problem)
            return [problem]
        self.access_log.replace(config.log.access_log, access_file)
        old_pools = proxy.pools
        pools = {}
        for backend in config.backends:
            pool = old_pools.get(backend.name)
            if pool is None or pool.backend != backend:
                pool = BackendPool(backend, backend_ssl_context(backend))
            pools[backend.name] = pool
        for name, pool in old_pools.items():
            if pools.get(name) is not pool:
                pool.retire()  # its requests in flight finish; its connections close after
        proxy.health.reconcile(config.backends, _breaker_settings(config))
        proxy.reconfigure(config, pools)
        probers.reconcile(config.backends, config.health)
        if self._load_readers is not None:
            self._load_readers.reconcile(config.backends, config.health)
        self._keys = keys
        self._config = config
        log.info("config reloaded from %s: %d backends", self._config_file, len(config.backends))
        return []

    async def _own_route(self, scope: Scope, send: Send, record: RequestRecord) -> None:
        path = scope["raw_path"]
        method = scope["method"]
        if path not in _OPEN_ROUTES and not self._admin_allowed(scope):
            error = client_error(401, "invalid_admin_token", "Admin token required")
            await refuse(send, record, error)
        elif path == b"/ntonix/health" and method == "GET":
            await send_json(send, 200, {"status": "ok"})
        elif path == b"/ntonix/ready" and method == "GET":
            ready = self.ready()
            await send_json(send, 200 if ready else 503, {"ready": ready})
        elif path == b"/metrics" and method == "GET" and (figures := await self.figures()):
            body = exposition(figures)
            await send_body(send, 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())])
        elif path == b"/ntonix/status" and method == "GET":
            await send_json(send, 200, await self.status())
        elif path == b"/ntonix/usage" and method == "GET" and (figures := await self.figures()):
            await send_json(send, 200, overview.usage(figures, time.time()))
        elif path == b"/ntonix/dashboard" and method == "GET":
            headers = [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"cache-control", b"no-store"),
                # The page may talk only to this gateway, and nobody may frame it.
                (b"content-security-policy", _DASHBOARD_CSP),
                (b"x-frame-options", b"DENY"),
            ]
            await send_body(send, 200, dashboard.page(), headers)
        elif path == b"/ntonix/cache" and method == "DELETE":
            await self.clear_cache(send)
        elif path == b"/ntonix/reload" and method == "POST":
            problems = self.reload()
            await send_json(
                send, 400 if problems else 200, {"reloaded": not problems, "problems": problems}
            )
        else:
            error = client_error(404, "unknown_route", f"Unknown route: {method} {scope['path']}")
            await refuse(send, record, error)

    def _admin_allowed(self, scope: Scope) -> bool:
        """No admin token set, or the request carries it: as a Bearer token, or for the
        dashboard (a browser cannot set headers on a page load or a websocket) as the `token`
        query parameter or the `ntonix_admin_token` cookie."""
        token = self.config.auth.admin_token
        if not token:
            return True
        if _bearer_matches(scope, token):
            return True
        if not scope["path"].startswith("/ntonix/dashboard"):
            return False
        expected = token.encode()
        offered = [
            *_query_values(scope["query_string"], b"token"),
            *_cookie_values(header(scope, b"cookie"), b"ntonix_admin_token"),
        ]
        return any(hmac.compare_digest(value, expected) for value in offered)

    async def _list_models(self, path: bytes, send: Send, record: RequestRecord) -> None:
        """/v1/models and /api/tags: the union of what the healthy backends serve (of those,
        what the key may use)."""
        assert self.proxy is not None and record.tenant is not None
        tenant = record.tenant
        served = self.proxy.health.served_models(trio.current_time())
        models = [model for model in served if tenant.may_use(model)]
        if path == b"/v1/models":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "ntonix"} for m in models
            ]
            await send_json(send, 200, {"object": "list", "data": data}, record.extra_headers)
        else:
            tags = [{"name": m, "model": m} for m in models]
            await send_json(send, 200, {"models": tags}, record.extra_headers)

    def ready(self) -> bool:
        """Some backend has answered since start and is healthy now (`HealthTable.ready`)."""
        proxy = self.proxy
        return proxy is not None and proxy.health.ready(trio.current_time())

    def _own_figures(self, window: bool) -> Figures:
        assert self.proxy is not None
        now = trio.current_time()
        dropped = self.access_log.dropped
        tier = self.tier.statistics() if self.tier else None
        figures = overview.own_figures(
            self.proxy,
            self.tallies,
            dropped,
            self.recent,
            now,
            window=window,
            tier=tier,
            usage=self.accounts.figures(),
        )
        return attrs.evolve(figures, sessions=self.session_tallies)

    async def figures(self, *, window: bool = False) -> Figures | None:
        """The gateway's figures: this worker's, or with N workers all of theirs, summed.
        None before the gateway started."""
        if self.proxy is None:
            return None
        own = self._own_figures(window)
        if self._workers is None:
            return merge([own])
        return await self._workers.gather(own, window=window)

    async def clear_cache(self, send: Send) -> None:
        """DELETE /ntonix/cache: this worker's L1, and with a tier every L2 entry. The other
        workers' and instances' L1 copies are not reached: they age out with the cache's TTL
        (docs/operations.md says why)."""
        cache = self.proxy.cache if self.proxy else None
        cleared = cache.clear() if cache else 0
        if cache is None or cache.shared is None:
            await send_json(send, 200, {"cleared": cleared})
            return
        try:
            shared = await cache.shared.clear()
        except TierUnavailable as error:
            message = f"This worker's cache was cleared, the shared tier's was not: {error}"
            await send_json(send, 503, {"cleared": cleared, "error": message})
            return
        await send_json(send, 200, {"cleared": cleared, "cleared_shared": shared})

    async def status(self, figures: Figures | None = None) -> dict[str, object]:
        """/ntonix/status: the whole gateway's backends, cache and queue."""
        if figures is None:
            figures = await self.figures()
        proxy = self.proxy
        urls = {b.name: b.url for b in proxy.config.backends} if proxy else {}
        uptime = time.monotonic() - self._started_at
        return overview.status(figures, urls, self.config.balancer.strategy, uptime)

    async def live_status(self) -> dict[str, object]:
        """What the dashboard shows each second: the status plus the last minute's rates."""
        figures = await self.figures(window=True)
        base = await self.status(figures)
        if figures is None:
            return base
        return overview.live_status(figures, base, self.recent.seconds)


_MODEL_LISTS = frozenset({b"/v1/models", b"/api/tags"})
_DASHBOARD_CSP = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"img-src data:; connect-src 'self'; frame-ancestors 'none'"
)


def api_keys(config: Config) -> ApiKeys:
    """The client keys: `auth.api_keys` plus the lines of `auth.api_keys_file` (OSError if it
    cannot be read), and the named `[[auth.keys]]`."""
    auth = config.auth
    keys = list(auth.api_keys)
    if auth.api_keys_file:
        with open(auth.api_keys_file, encoding="utf-8") as file:
            keys += keys_from_file(file.read())
    named = {
        entry.key_sha256 or digest(entry.key): Tenant(
            entry.name,
            f"key:{entry.name}",
            requests_per_minute=entry.requests_per_minute,
            max_concurrent=entry.max_concurrent,
            tokens_per_minute=entry.tokens_per_minute,
            tokens_per_day=entry.tokens_per_day,
            batch=entry.priority == "batch",
            weight=entry.weight,
            models=frozenset(entry.models),
        )
        for entry in auth.keys
    }
    return ApiKeys(
        keys,
        named,
        requests_per_minute=auth.requests_per_minute,
        max_concurrent=auth.max_concurrent_per_key,
    )


def tier_for(config: Config, embedded: str | None = None) -> SharedTier | None:
    """The shared tier `[shared] url` names, or None; "embedded" is the server `ntonix serve`
    runs, at the socket URL `embedded` (ValueError without one: the hypercorn command)."""
    settings = config.shared
    if not settings.url:
        return None
    if settings.embedded:
        if embedded is None:
            raise ValueError(
                '[shared] url = "embedded" needs `ntonix serve`, which runs the valkey-server; '
                "with the hypercorn command, give the URL of a running Valkey"
            )
        settings = attrs.evolve(settings, url=embedded)
    return SharedTier.from_settings(settings)


def _breaker_settings(config: Config) -> BreakerSettings:
    health = config.health
    return BreakerSettings(health.failure_threshold, health.open_for, health.max_open_for)


def _query_values(query: bytes, name: bytes) -> list[bytes]:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return [value for key, value in pairs if key == name]


def _cookie_values(cookies: bytes, name: bytes) -> list[bytes]:
    values = []
    for pair in cookies.replace(b",", b";").split(b";"):
        key, _, value = pair.strip().partition(b"=")
        if key == name:
            values.append(value.strip(b'"'))
    return values


def _bearer_matches(scope: Scope, token: str) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return hmac.compare_digest(value, b"Bearer " + token.encode())
    return False


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


async def _drain_hypercorn_on_sigterm() -> None:
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


async def refuse(
    send: Send, record: RequestRecord, error: GatewayError, *, close: bool = False
) -> None:
    """Answer with the gateway's own error, and note it for the access log."""
    record.status = error.status
    record.outcome = "error"
    record.error = error.code
    await send_error(send, error, dialect_of(record.path), close=close, extra=record.extra_headers)


def recording(send: Send, record: RequestRecord) -> Send:
    """`send`, noting status and body bytes for a response the gateway writes itself (the
    proxied ones are noted by their Downstream)."""

    async def send_and_note(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            record.status = cast(int, message["status"])
        else:
            body = cast(bytes, message.get("body", b""))
            if body:
                record.note_body(len(body), trio.current_time)
        await send(message)

    return send_and_note


async def send_error(
    send: Send,
    error: GatewayError,
    dialect: Dialect,
    *,
    close: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """The error in the client's dialect (OpenAI's or Ollama's shape).

    `close` asks Hypercorn (h11) to close the connection after this response: for a request
    whose framing is in doubt, what follows it on the connection cannot be trusted. HTTP/1
    only: HTTP/2 forbids the header and its streams are framed by the protocol."""
    headers = error.headers()[1:] + (extra or [])
    if close:
        headers.append((b"connection", b"close"))
    await send_json(send, error.status, error.payload(dialect), headers)
