"""What the gateway tells its operator in the log: the setup it starts with, circuit changes.

At start, one line each: where the config came from (a file, or the built-in default when none
was found), every backend, the strategy, the cache, the shared tier when there is one (its URL
without a password) and the access log. The listening URLs
follow in the server's `Running on` lines. Later, one line per circuit change of a backend.
"""

from __future__ import annotations

import logging

from ntonix.config import DEFAULT_BACKEND_URL, Config
from ntonix.core.breaker import State
from ntonix.core.health import CircuitChange
from ntonix.core.valkey_url import parse_valkey_url, shown

log = logging.getLogger("ntonix")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr_unless_configured() -> None:
    """Under the plain hypercorn command: Hypercorn sets up only its own loggers, so without a
    handler the gateway's INFO lines (its setup, a backend coming back) would go nowhere and
    its warnings would lose their time and level. A logging config of the user's wins."""
    if logging.getLogger().handlers or log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def start_lines(config: Config, config_file: str | None) -> list[str]:
    if config_file is not None:
        origin = f"config: read from {config_file}"
    elif config == Config.default():
        origin = (
            "config: no file found (no --config, $NTONIX_CONFIG unset, no ./ntonix.toml): "
            f"the built-in default, a local Ollama at {DEFAULT_BACKEND_URL.split('//')[1]}"
        )
    else:
        origin = "config: built in code (ntonix demo, or a program that embeds the gateway)"
    lines = [origin]
    for backend in config.backends:
        models = ", ".join(backend.models) or "any"
        limit = backend.max_concurrent or "unlimited"
        lines.append(
            f"backend {backend.name}: {backend.url}, models {models}, weight {backend.weight}, "
            f"max_concurrent {limit}"
        )
    lines.append(f"balancer: {config.balancer.strategy}")
    cache = config.cache
    if cache.enabled:
        lines.append(
            f"cache: on, up to {cache.max_entries} entries and {cache.max_bytes / 2**20:g} MiB, "
            f"ttl {cache.ttl:g} s, scope {cache.scope}"
            + (", deterministic requests only" if cache.deterministic_only else "")
        )
    else:
        lines.append("cache: off")
    if config.shared.url:
        lines.append(_tier_line(config))
    lines.append(f"access log: {config.log.access_log}")
    return lines


def _tier_line(config: Config) -> str:
    shared = config.shared
    if shared.embedded:
        where = (
            "embedded valkey-server (private to this ntonix serve: unix socket, no persistence, "
            f"up to {config.cache.max_bytes / 2**20:g} MiB, allkeys-lru)"
        )
    else:
        # Checked when the config was read; the password is never shown.
        where = f"{shown(parse_valkey_url(shared.url))} (remote)"
    return f"shared tier: {where}, timeout {shared.timeout * 1000:g} ms, lease {shared.lease:g} s"


def log_start(config: Config, config_file: str | None) -> None:
    for line in start_lines(config, config_file):
        log.info("%s", line)


def log_circuit_change(change: CircuitChange) -> None:
    """An ejection is a warning; a backend on its way back is news."""
    level = logging.WARNING if change.after is State.OPEN else logging.INFO
    log.log(level, "%s", change)
