"""Tenants: who a request is for, as the limits, the queue and the usage tallies see it.

Invariants: a tenant's `name` is what logs, metrics and /ntonix/usage show, and it is never
the key: a named key shows its configured name, every other client "anonymous", so the label
set stays as small as the config. `identity` is what limits and the fair queue count by: one
per named key, one per plain key (its digest) and, without auth, one per client address.
"""

from __future__ import annotations

import attrs

ANONYMOUS = "anonymous"


@attrs.frozen
class Tenant:
    """One client's allowances; every limit at 0 is off."""

    name: str
    identity: str
    requests_per_minute: int = 0
    max_concurrent: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    batch: bool = False  # queued behind interactive requests (until they age)
    weight: int = 1  # share of the freed slots among the keys of its class
    models: frozenset[str] = frozenset()  # empty: every model

    def may_use(self, model: str | None) -> bool:
        """A request that names no model has nothing to refuse (the route lists or shows)."""
        return not self.models or model is None or model in self.models

    @property
    def counts_tokens(self) -> bool:
        return bool(self.tokens_per_minute or self.tokens_per_day)

    @property
    def rate_limited(self) -> bool:
        """Its responses carry the x-ratelimit-* headers: it has a per-minute or daily limit."""
        return bool(self.requests_per_minute or self.counts_tokens)


def anonymous(identity: str, *, requests_per_minute: int = 0, max_concurrent: int = 0) -> Tenant:
    """A client known by a plain key's digest or its address, with [auth]'s shared limits."""
    return Tenant(
        ANONYMOUS,
        identity,
        requests_per_minute=requests_per_minute,
        max_concurrent=max_concurrent,
    )
