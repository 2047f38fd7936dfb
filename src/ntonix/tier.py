"""The shared tier: one Valkey connection per worker, and the one place its errors become ours.

Every call runs under the `[shared] timeout` budget; a call past it, or one that fails in any
way, raises `TierUnavailable` and its caller goes on without the tier (L1 cache only, limits
counted in the worker). A breaker on the tier itself (the backends' own, core/breaker.py)
stops calling it after `FAILURE_THRESHOLD` failures in a row, for `OPEN_FOR` seconds, doubling
while it stays down; then one trial call (the prober's PING or a request's) decides. So a dead
Valkey costs a request at most one budget, the tier going down and coming back are each logged
once, and when Valkey returns it is used again without a restart (glide reconnects by itself).

valkey-glide is an optional dependency (ntonix[shared]): it is imported when a tier connects,
and config_validation.py refuses a `[shared] url` without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from ntonix.config import SharedSettings
from ntonix.core.breaker import BreakerSettings, CircuitBreaker, Event, State, Transition
from ntonix.core.valkey_url import ValkeyAddress, parse_valkey_url, shown

if TYPE_CHECKING:
    import glide

log = logging.getLogger("ntonix.shared")

FAILURE_THRESHOLD = 3
OPEN_FOR = 0.5
MAX_OPEN_FOR = 5.0
# How often the prober PINGs: it notices a dead or returning Valkey without traffic.
PROBE_INTERVAL = 0.5
# How long the prober's own TLS handshake may take when it looks for why a valkeys:// tier is down.
TLS_CHECK_TIMEOUT = 2.0

T = TypeVar("T")


# A standalone client on a cluster node gets MOVED or CLUSTERDOWN for most keys, and the
# lookup script's keys span hash slots: found out, the tier is refused rather than half-used.
CLUSTER_REFUSED = (
    "[shared] url names a node of a Valkey cluster (cluster_enabled:1): cluster mode is not "
    "supported; give the URL of a standalone server or of a primary (with replicas or not)"
)


class TierUnavailable(Exception):
    """The tier did not answer within its budget, failed, or is skipped while its breaker is
    open: go on without it."""


@attrs.frozen
class TierStatistics:
    up: bool  # the breaker is closed: calls go to Valkey
    state: str  # closed, open, half-open
    calls: int
    failures: int  # calls that failed or outran the budget
    skipped: int  # calls not made while the breaker was open
    transitions: int


class SharedTier:
    """The worker's connection to Valkey, behind a budget and a breaker."""

    def __init__(
        self, settings: SharedSettings, address: ValkeyAddress, ca_certs: bytes | None = None
    ) -> None:
        self.settings = settings
        self.address = address
        self.ca_certs = ca_certs  # PEM: the CAs a valkeys:// server's certificate must chain to
        self._client: glide.GlideClient | None = None
        self._breaker = CircuitBreaker(BreakerSettings(FAILURE_THRESHOLD, OPEN_FOR, MAX_OPEN_FOR))
        self.calls = self.failures = self.skipped = 0
        self._errors: tuple[type[Exception], ...] = (trio.TooSlowError,)
        self._told_cannot_create = False
        self._answered_at = -math.inf  # when a call last succeeded
        self._cluster_checked = False
        self.refused = ""  # why the tier is off for good (a cluster), once found out

    @classmethod
    def from_settings(cls, settings: SharedSettings) -> SharedTier:
        """The tier `settings.url` names (already resolved: not "embedded"); reads
        `password_file` and `ca_file` (OSError if it cannot, ValueError if the CA file holds no
        certificate)."""
        address = parse_valkey_url(settings.url)
        if settings.password_file:
            with open(settings.password_file, encoding="utf-8") as file:
                address = attrs.evolve(address, password=file.read().strip())
        ca_certs = None
        if settings.ca_file:
            with open(settings.ca_file, "rb") as file:
                ca_certs = file.read()
            # glide would take any bytes and fail every handshake later, unexplained.
            if b"-----BEGIN CERTIFICATE-----" not in ca_certs:
                raise ValueError(f"[shared] ca_file {settings.ca_file}: no PEM certificate in it")
        return cls(settings, address, ca_certs)

    @property
    def up(self) -> bool:
        return self._client is not None and self._breaker.closed

    async def connect(self) -> None:
        """Create the client. It connects lazily: this never waits for the server, so a
        gateway starts (on L1 alone) while Valkey is down."""
        import glide  # optional: only a gateway with a tier needs it

        self._errors = (glide.GlideError, trio.TooSlowError)
        # Its errors reach us as exceptions; its own log would print each reconnect attempt.
        glide.Logger.set_logger_config(glide.LogLevel.OFF)
        address = self.address
        node = (
            glide.NodeAddress(unix_socket_path=address.unix_path)
            if address.unix_path
            else glide.NodeAddress(address.host, address.port)
        )
        credentials = (
            glide.ServerCredentials(address.password, address.username or None)
            if address.password
            else None
        )
        budget_ms = math.ceil(self.settings.timeout * 1000)
        # Without a CA file a valkeys:// server's certificate is checked against the system's
        # trust store; with one, against its CAs only (glide replaces the store, never adds).
        advanced = (
            glide.AdvancedGlideClientConfiguration(
                tls_config=glide.TlsAdvancedConfiguration(root_pem_cacerts=self.ca_certs)
            )
            if self.ca_certs is not None
            else None
        )
        configuration = glide.GlideClientConfiguration(
            [node],
            use_tls=address.tls,
            credentials=credentials,
            database_id=address.database,
            # Our budget cancels a call first; this only bounds the request in glide's core.
            request_timeout=max(2 * budget_ms, 10),
            # Back quickly after a Valkey restart: 50 ms doubling, at most 1.6 s apart.
            reconnect_strategy=glide.BackoffStrategy(num_of_retries=5, factor=50, exponent_base=2),
            client_name="ntonix",
            lazy_connect=True,
            advanced_config=advanced,
        )
        try:
            self._client = await glide.GlideClient.create(configuration)
        except glide.GlideError as error:
            if not self._told_cannot_create:
                self._told_cannot_create = True
                log.error("shared tier: cannot create its client (%s); retrying", error)

    async def call(
        self, operation: Callable[[glide.GlideClient], Awaitable[T]], budget: float | None = None
    ) -> T:
        """Run one operation on Valkey within the budget (`[shared] timeout` unless given:
        an admin action takes a larger one); TierUnavailable if it cannot."""
        now = trio.current_time()
        breaker = self._breaker
        client = self._client
        if client is None or not breaker.may_try(now):
            self.skipped += 1
            raise TierUnavailable("the shared tier is down")
        trial = breaker.needs_trial(now)
        if trial:
            breaker.begin_trial(now)
        self.calls += 1
        try:
            with trio.fail_after(self.settings.timeout if budget is None else budget):
                result = await operation(client)
        except self._errors as error:  # glide's errors and our budget: nothing else
            self.failures += 1
            slow = isinstance(error, trio.TooSlowError)
            # One line: glide's messages may end in a newline.
            reason = "no answer within the budget" if slow else " ".join(str(error).split())
            self._note(Event.TRIAL_FAILED if trial else Event.FAILURE, reason)
            raise TierUnavailable(str(reason)) from None
        except BaseException:
            # Cancelled from outside (the client left): no verdict on the tier.
            if trial:
                self._note(Event.TRIAL_ABANDONED, "")
            raise
        self._answered_at = trio.current_time()
        self._note(Event.TRIAL_SUCCEEDED if trial else Event.SUCCESS, "")
        return result

    async def refuses_cluster(self) -> bool:
        """Whether the server is a cluster node, which the tier refuses: then it is off for
        good (logged once, every call skipped). Asked once the server answers; False while it
        cannot tell."""
        if not self._cluster_checked:
            with contextlib.suppress(TierUnavailable):
                info = await self.call(_cluster_info)
                self._cluster_checked = True
                if b"cluster_enabled:1" in info:
                    self.refused = CLUSTER_REFUSED
                    log.error("shared tier: %s; going on without it", CLUSTER_REFUSED)
                    await self.aclose()
        return bool(self.refused)

    async def probe_forever(self) -> None:
        """PING every PROBE_INTERVAL unless a call answered within it: the breaker opens and
        closes without traffic too. The first answer it gets says whether the server is a
        cluster node (refused: the prober ends). Once per outage of a valkeys:// tier, it says
        whether the TLS handshake is what fails."""
        looked_at_tls = False
        while True:
            await trio.sleep(PROBE_INTERVAL)
            answered_lately = trio.current_time() - self._answered_at < PROBE_INTERVAL
            if self._cluster_checked and self.up and answered_lately:
                continue  # requests' calls say it is up: a PING would only cost CPU
            if self._client is None:
                await self.connect()
            if not self._cluster_checked:
                if await self.refuses_cluster():  # a call: it stands for the PING
                    return
            else:
                with contextlib.suppress(TierUnavailable):
                    await self.call(_ping)
            if self.up:
                looked_at_tls = False
            elif self.address.tls and not looked_at_tls:
                looked_at_tls = True
                await self._log_tls_problem()

    async def _log_tls_problem(self) -> None:
        # glide reports a certificate it cannot verify as a connection that "timed out": our
        # own handshake, with the same CAs and name, tells the operator what is wrong.
        address = self.address
        context = ssl.create_default_context(
            cadata=self.ca_certs.decode("ascii", "replace") if self.ca_certs else None
        )
        with trio.move_on_after(TLS_CHECK_TIMEOUT):
            try:
                stream = await trio.open_ssl_over_tcp_stream(
                    address.host, address.port, ssl_context=context
                )
                async with stream:
                    await stream.do_handshake()
            except (OSError, trio.BrokenResourceError) as error:
                reason = error.__cause__ if isinstance(error.__cause__, ssl.SSLError) else error
                if isinstance(reason, ssl.SSLError):
                    advice = "ca_file" if self.ca_certs else "ca_file (none set: system CAs)"
                    log.error(
                        "shared tier: TLS with %s fails: %s; check [shared] %s",
                        shown(address),
                        reason,
                        advice,
                    )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with trio.move_on_after(1):
                await client.close()

    def statistics(self) -> TierStatistics:
        stats = self._breaker.statistics(trio.current_time())
        return TierStatistics(
            up=self.up,
            state=stats.state.value,
            calls=self.calls,
            failures=self.failures,
            skipped=self.skipped,
            transitions=stats.transitions,
        )

    def _note(self, event: Event, reason: object) -> None:
        transition: Transition | None = self._breaker.apply(event, trio.current_time())
        if transition is None:
            return
        if transition.before is State.CLOSED:
            log.warning(
                "shared tier down (%s): going on without it (L1 cache only, limits counted "
                "per worker) and trying again in %g s",
                reason,
                self._breaker.statistics(transition.at).open_for,
            )
        elif transition.after is State.CLOSED:
            log.info("shared tier is back: using it again")


async def _ping(client: glide.GlideClient) -> bytes:
    return await client.ping()


async def _cluster_info(client: glide.GlideClient) -> bytes:
    info = await client.custom_command(["INFO", "cluster"])
    return info if isinstance(info, bytes) else str(info).encode()
