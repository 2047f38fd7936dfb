"""The ASGI application: the lifespan owns the supervisor nursery; requests are routed here.

Invariants this module owns:
- The supervisor nursery outlives every request: Hypercorn drains requests before it sends
  lifespan.shutdown, and the long-lived tasks (probers, load readers, the tier, the cache's
  writer, the access log) start in it once, before lifespan.startup.complete.
- Every HTTP request gets one RequestRecord, counted and logged once when it ends; only API
  traffic (/v1, /api) feeds the metrics and the dashboard.
- A reload swaps in a whole new config or none of it: a refused file leaves the running one.
"""

from __future__ import annotations

import logging
import signal
import time

import attrs
import trio

from ntonix import dashboard, hypercorn_ws, overview
from ntonix.accesslog import AccessLog, open_target
from ntonix.accounts import Accounts
from ntonix.announce import log_circuit_change, log_start
from ntonix.asgi import Receive, Scope, Send, header
from ntonix.assembly import api_keys, breaker_settings, tier_for
from ntonix.cache import ResponseCache
from ntonix.config import Config, ConfigError, config_path
from ntonix.core.auth import ApiKeys
from ntonix.core.figures import Figures, merge
from ntonix.core.headers import request_id_of
from ntonix.core.health import HealthTable
from ntonix.core.hygiene import check_request
from ntonix.core.limits import ClientLimits, Verdict
from ntonix.core.requests import is_proxied, method_error, path_error
from ntonix.core.sessions import SessionTallies
from ntonix.core.telemetry import RecentWindow, RequestRecord, Tallies
from ntonix.core.token_limits import ratelimit_headers
from ntonix.downstream import new_request_id
from ntonix.errors import GatewayError, client_error
from ntonix.gathering import WorkerGroup
from ntonix.hypercorn_command import config_for_hypercorn_command, drain_hypercorn_on_sigterm
from ntonix.load_reader import LoadReaders
from ntonix.own_routes import (
    MODEL_LISTS,
    admin_allowed,
    list_models,
    recording,
    refuse,
    serve_own_route,
)
from ntonix.prober import Probers
from ntonix.proxy import Proxy
from ntonix.shared_cache import SharedCache
from ntonix.shared_flights import SharedFlights
from ntonix.shared_limits import KeyLimits, Ticket
from ntonix.shared_tokens import SharedTokens
from ntonix.tier import SharedTier
from ntonix.upstream import BackendPool, backend_ssl_context
from ntonix.websocket_proxy import Sessions

log = logging.getLogger("ntonix")


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
                    await serve_own_route(self, scope, recording(send, record), record)
            finally:
                self._finish(record, api=api)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif self.sessions is not None and is_proxied(scope["raw_path"]):
            await self.sessions.serve(scope, receive, send)
        elif scope["path"] == "/ntonix/dashboard/ws" and admin_allowed(
            scope, self.config.auth.admin_token
        ):
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
            elif scope["method"] in ("GET", "HEAD") and scope["raw_path"] in MODEL_LISTS:
                await list_models(proxy, scope["raw_path"], recording(send, record), record)
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
            config.backends, breaker_settings(config), on_change=log_circuit_change
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
                supervisor.start_soon(drain_hypercorn_on_sigterm)
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
        proxy.health.reconcile(config.backends, breaker_settings(config))
        proxy.reconfigure(config, pools)
        probers.reconcile(config.backends, config.health)
        if self._load_readers is not None:
            self._load_readers.reconcile(config.backends, config.health)
        self._keys = keys
        self._config = config
        log.info("config reloaded from %s: %d backends", self._config_file, len(config.backends))
        return []

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
