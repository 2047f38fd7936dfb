"""The parts of the gateway built from a Config: client keys, the shared tier, breakers.

Invariants this module owns:
- Each part is built the same way at start and on a reload, so a reload cannot differ from a
  fresh start with the same file.
- Building does no network I/O: the tier connects when the lifespan starts it; only the
  `auth.api_keys_file` is read (OSError when it cannot be).
"""

import attrs

from ntonix.config import Config
from ntonix.core.auth import ApiKeys, digest, keys_from_file
from ntonix.core.breaker import BreakerSettings
from ntonix.core.tenants import Tenant
from ntonix.tier import SharedTier


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


def breaker_settings(config: Config) -> BreakerSettings:
    health = config.health
    return BreakerSettings(health.failure_threshold, health.open_for, health.max_open_for)
