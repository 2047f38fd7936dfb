"""The config file of SPEC section 2: its tables as frozen attrs records, and how it is found.

Invariants this module owns:
- The attrs classes are the single source of truth for table names, key names, types and
  defaults. `config_validation._RULES` only adds constraints, keyed by those names.
- Every Config that a named constructor (`from_mapping`, `from_toml`, `from_file`, `default`)
  or `load_config` returns satisfies every rule of SPEC section 2 (`config_validation` checks
  them). `__init__` stays dumb and trusts its caller, except that BackendSettings always
  splits its URL (`core/backend_url.py`: scheme, host, port, base_path and host_header, once)
  and raises ValueError on one it cannot split.
- Bad input never escapes as anything but ConfigError: all problems are collected and raised
  once, one line each, starting with the key path (`gateway.idle_timeout`, `backends[0].url`;
  backends are counted from 0), or with the file's path when it cannot be read or parsed.
- Messages never echo secrets (api_key, api_keys, admin_token, URL credentials).
- No I/O beyond reading the one config file; no trio or httpx here.
"""

import os
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any, Self, TextIO

import attrs

from ntonix.core.backend_url import split_backend_url

BALANCER_STRATEGIES = (
    "least-loaded",
    "least-connections",
    "weighted-round-robin",
    "power-of-two",
    "prefix-affinity",
)
CACHE_SCOPES = ("key", "global")
# Where a backend's load signals come from (core/engines.py); "auto" detects it.
ENGINES = ("auto", "vllm", "sglang", "llamacpp", "tgi", "ollama", "none")
EMBEDDED = "embedded"  # [shared] url: ntonix serve runs a private valkey-server
PRIORITIES = ("interactive", "batch")
CONFIG_ENV_VAR = "NTONIX_CONFIG"
CONFIG_FILE_NAME = "ntonix.toml"
DEFAULT_BACKEND_URL = "http://127.0.0.1:11434"  # a local Ollama


class ConfigError(Exception):
    """A config that cannot be used: `problems` has one line per problem, key path first."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def report(self) -> str:
        """What a command prints when it refuses to start."""
        return "ntonix: invalid configuration:\n" + "".join(f"  {p}\n" for p in self.problems)


@attrs.frozen
class GatewaySettings:
    """[gateway]: limits and timeouts of the proxy itself. Seconds and bytes."""

    max_request_body: int = 4 * 1024 * 1024
    upstream_connect_timeout: float = 2.0
    first_byte_timeout: float = 60.0
    idle_timeout: float = 30.0
    retries: int = 2
    queue_timeout: float = 5.0
    graceful_timeout: float = 30.0
    body_timeout: float = 30.0
    max_connections: int = 10000
    batch_aging: float = 10.0  # a batch request queued this long is served as interactive
    max_connections_per_client: int = 256
    handshake_timeout: float = 5.0


@attrs.frozen
class BackendSettings:
    """One [[backends]] entry; the fields after tls_verify are derived from `url`."""

    name: str
    url: str
    weight: int = 1
    models: tuple[str, ...] = ()  # empty: serves any model
    max_concurrent: int = 0  # 0: unlimited
    api_key: str = attrs.field(default="", repr=False)
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    tls_verify: bool = True
    engine: str = "auto"  # one of ENGINES: whose load signals to read
    scheme: str = attrs.field(init=False, repr=False, eq=False)  # "http" or "https"
    host: str = attrs.field(init=False, repr=False, eq=False)  # lower case, IPv6 without brackets
    port: int = attrs.field(init=False, repr=False, eq=False)  # 80/443 when the URL has none
    base_path: str = attrs.field(init=False, repr=False, eq=False)  # "" or "/prefix"
    host_header: bytes = attrs.field(init=False, repr=False, eq=False)  # b"host[:port]"

    def __attrs_post_init__(self) -> None:
        split = split_backend_url(self.url)
        object.__setattr__(self, "scheme", split.scheme)
        object.__setattr__(self, "host", split.host)
        object.__setattr__(self, "port", split.port)
        object.__setattr__(self, "base_path", split.base_path)
        object.__setattr__(self, "host_header", split.host_header)


@attrs.frozen
class BalancerSettings:
    """[balancer]: how a backend is picked among the eligible ones."""

    strategy: str = "least-loaded"  # one of BALANCER_STRATEGIES
    slow_start: float = 30.0  # a backend back in service ramps to its weight over this; 0 = off


@attrs.frozen
class HealthSettings:
    """[health]: active probes and the circuit breaker. Seconds."""

    interval: float = 5.0
    timeout: float = 2.0
    path: str = "/v1/models"
    failure_threshold: int = 3
    open_for: float = 10.0
    max_open_for: float = 300.0
    load_interval: float = 1.0  # how often each backend's load signals are read (with jitter)
    load_timeout: float = 0.5  # one read of them


@attrs.frozen
class CacheSettings:
    """[cache]: the response cache. Bytes and seconds."""

    enabled: bool = True
    max_entries: int = 10000
    max_bytes: int = 256 * 1024 * 1024
    ttl: float = 600.0
    scope: str = "key"  # one of CACHE_SCOPES
    deterministic_only: bool = True


@attrs.frozen
class KeySettings:
    """One [[auth.keys]] entry: a named client key and its own limits (0 = no limit)."""

    name: str = ""
    key: str = attrs.field(default="", repr=False)
    key_sha256: str = ""  # the key's SHA-256 in hex, so the config need not hold the secret
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    max_concurrent: int = 0
    priority: str = "interactive"  # one of PRIORITIES
    weight: int = 1  # its share of the freed slots when requests queue
    models: tuple[str, ...] = ()  # empty: every model


@attrs.frozen
class AuthSettings:
    """[auth]: client API keys, the admin token and per-key limits (0 = off).

    `requests_per_minute` and `max_concurrent_per_key` apply to each plain key (and to each
    client address without auth); a named key in `keys` has its own limits instead."""

    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    api_keys_file: str = ""
    admin_token: str = attrs.field(default="", repr=False)
    requests_per_minute: int = 0
    max_concurrent_per_key: int = 0
    keys: tuple[KeySettings, ...] = ()


@attrs.frozen
class UsageSettings:
    """[usage]: token accounting."""

    # Ask the backend for usage on OpenAI streams whose client did not (stream_options), and
    # take the usage-only chunk out of what that client receives.
    request_stream_usage: bool = True


@attrs.frozen
class LogSettings:
    """[log]: where the access log goes: one JSON line per client request."""

    access_log: str = "stderr"  # "stderr", "off", or the path of a file to append to


@attrs.frozen
class SharedSettings:
    """[shared]: the tier on Valkey that workers and instances share. Seconds.

    Read when the gateway starts: a reload keeps the running tier."""

    url: str = attrs.field(default="", repr=False)  # "", "embedded" or a Valkey URL
    password_file: str = ""
    ca_file: str = ""  # PEM CAs for a valkeys:// server's certificate; "": the system's
    timeout: float = 0.05
    lease: float = 10.0
    # How long a busy worker's lookup call may wait for the lookups of the requests it is
    # working on (shared_cache.py); 0: never (measured no cheaper on a busy machine).
    lookup_hold: float = 0.0005

    @property
    def embedded(self) -> bool:
        return self.url == EMBEDDED


@attrs.frozen
class WebSocketSettings:
    """[websocket]: sessions proxied on /v1/* and /api/* (the Realtime API). Bytes and seconds."""

    max_message_size: int = 16 * 1024 * 1024
    idle_timeout: float = 60.0
    ping_interval: float = 20.0  # 0: no pings


@attrs.frozen
class Config:
    """The whole config file: one record per table."""

    backends: tuple[BackendSettings, ...]
    gateway: GatewaySettings = attrs.field(factory=GatewaySettings)
    balancer: BalancerSettings = attrs.field(factory=BalancerSettings)
    health: HealthSettings = attrs.field(factory=HealthSettings)
    cache: CacheSettings = attrs.field(factory=CacheSettings)
    auth: AuthSettings = attrs.field(factory=AuthSettings)
    usage: UsageSettings = attrs.field(factory=UsageSettings)
    log: LogSettings = attrs.field(factory=LogSettings)
    websocket: WebSocketSettings = attrs.field(factory=WebSocketSettings)
    shared: SharedSettings = attrs.field(factory=SharedSettings)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Self:
        """Build a Config from parsed TOML; raise ConfigError listing every problem found."""
        # Imported here: the checks are keyed by this module's records.
        from ntonix.config_validation import config_sections

        return cls(**config_sections(data))

    @classmethod
    def from_toml(cls, text: str) -> Self:
        """Parse TOML text; syntax errors become a ConfigError with line and column."""
        return cls.from_mapping(_parse_toml(text, ""))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        """Read and parse a TOML file; every problem, unreadable file included, is a ConfigError."""
        where = f"{os.fspath(path)}: "
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except OSError as err:
            raise ConfigError(f"{where}cannot read the config file: {err.strerror or err}") from err
        try:
            text = raw.decode("utf-8-sig")  # editors on Windows like to add a BOM
        except UnicodeDecodeError as err:
            raise ConfigError(f"{where}not UTF-8 text (bad byte at offset {err.start})") from err
        return cls.from_mapping(_parse_toml(text, where))

    @classmethod
    def default(cls) -> Self:
        """The built-in config: one local Ollama backend, every other key at its default."""
        return cls.from_mapping({"backends": [{"url": DEFAULT_BACKEND_URL}]})


def config_path(
    path: str | None = None, *, environ: Mapping[str, str] = os.environ, cwd: str | None = None
) -> str | None:
    """The file the gateway's config comes from, or None for the built-in default.

    Lookup order: `path`, else $NTONIX_CONFIG (when set and not empty), else ./ntonix.toml when
    it exists. Relative paths are taken from `cwd` (default: the process's).
    """
    chosen = path or environ.get(CONFIG_ENV_VAR)
    if chosen:
        return os.path.abspath(chosen if cwd is None else os.path.join(cwd, chosen))
    local = os.path.join(os.getcwd() if cwd is None else cwd, CONFIG_FILE_NAME)
    # A dangling symlink is reported when it is read, not silently skipped.
    return os.path.abspath(local) if os.path.lexists(local) else None


def load_config(
    path: str | None = None, *, environ: Mapping[str, str] = os.environ, cwd: str | None = None
) -> Config:
    """Load the config the gateway starts with, from `config_path(...)` or the default."""
    chosen = config_path(path, environ=environ, cwd=cwd)
    return Config.default() if chosen is None else Config.from_file(chosen)


def check_config_file(path: str, out: TextIO) -> int:
    """Validate one config file for `ntonix check-config`; return the exit status.

    Prints "ok: PATH (N backends)" and returns 0, or prints each problem on its own line and
    returns 1.
    """
    try:
        config = Config.from_file(path)
    except ConfigError as err:
        for problem in err.problems:
            print(problem, file=out)
        return 1
    count = len(config.backends)
    print(f"ok: {path} ({count} backend{'' if count == 1 else 's'})", file=out)
    return 0


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends with "(at line L, column C)"
        raise ConfigError(f"{where}invalid TOML: {err}") from err
