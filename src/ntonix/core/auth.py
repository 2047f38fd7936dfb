"""Client API keys: who may use the gateway.

Invariants: keys are held only as SHA-256 digests, and a presented key is checked by hashing it
and looking the digest up, so how long a check takes tells nothing about how close a guess was;
a key is never logged or returned (its identity is its digest); a gateway with no keys
configured lets everyone in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The configured keys (config `api_keys` plus the lines of `api_keys_file`)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = frozenset(digest(key) for key in keys if key)

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: bytes) -> str | None:
        """The digest of a valid `Authorization: Bearer KEY`, else None."""
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        identity = hashlib.sha256(token.strip()).hexdigest()
        return identity if identity in self._digests else None


def keys_from_file(text: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
