"""Client API keys: who may use the gateway, and as which tenant.

Invariants: keys are held only as SHA-256 digests, and a presented key is checked by hashing it
and looking the digest up, so how long a check takes tells nothing about how close a guess was;
a key is never logged or returned (a plain key's identity is its digest, a named key's its
name); a gateway with no keys configured lets everyone in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from ntonix.core.tenants import Tenant, anonymous


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The configured keys: plain ones (config `api_keys` plus the lines of `api_keys_file`),
    which share [auth]'s limits, and named ones (`[[auth.keys]]`), by digest."""

    def __init__(
        self,
        plain: Iterable[str],
        named: Mapping[str, Tenant] | None = None,
        *,
        requests_per_minute: int = 0,
        max_concurrent: int = 0,
    ) -> None:
        self._plain = frozenset(digest(key) for key in plain if key)
        self._named = {key.lower(): tenant for key, tenant in (named or {}).items()}
        self._requests_per_minute = requests_per_minute
        self._max_concurrent = max_concurrent

    @property
    def required(self) -> bool:
        return bool(self._plain or self._named)

    @property
    def tenants(self) -> list[Tenant]:
        return list(self._named.values())

    def identify(self, authorization: bytes) -> Tenant | None:
        """The tenant of a valid `Authorization: Bearer KEY`, else None."""
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        identity = hashlib.sha256(token.strip()).hexdigest()
        named = self._named.get(identity)
        if named is not None:
            return named
        return self.anonymous(identity) if identity in self._plain else None

    def anonymous(self, identity: str) -> Tenant:
        """A plain key (by digest) or, without auth, a client address."""
        return anonymous(
            identity,
            requests_per_minute=self._requests_per_minute,
            max_concurrent=self._max_concurrent,
        )


def keys_from_file(text: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
