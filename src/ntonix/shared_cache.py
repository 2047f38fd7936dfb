"""Level 2 of the response cache: entries in Valkey, shared by every worker and instance.

One entry is one value (core/shared_entry.py) written by one SET with the cache's TTL, so a
reader sees a whole entry or none. Key names hold the cache key (a SHA-256 of the request and
its tenant scope), never request text. A value that does not decode (cut short, altered,
foreign) is a miss, counted as `rejected`. Every call is a tier call: within the budget, and a
failed or skipped one is a miss too; the request goes on with L1 alone.

A call to Valkey costs the gateway about as much CPU as a tenth of a request, so calls are
shared: the lookups that arrive within one scheduling round go out as one MGET, and the writer
sends the entries waiting for it as one pipeline of SETs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from ntonix.core.lru import CachedResponse
from ntonix.core.shared_entry import UnusableEntry, decode, encode
from ntonix.tier import SharedTier, TierUnavailable

if TYPE_CHECKING:
    import glide

log = logging.getLogger("ntonix.shared")

KEY_PREFIX = "ntonix:cache:"


def entry_name(key: str) -> str:
    """The Valkey key of the cache entry for `key`."""
    return KEY_PREFIX + key


class _Lookups:
    """Names asked for in one scheduling round, answered by one MGET."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.values: dict[str, bytes | None] = {}
        self.failed = False
        self.done = trio.Event()


class SharedCache:
    """Reads and writes of cached responses in the tier, with their counters."""

    def __init__(self, tier: SharedTier, ttl: float) -> None:
        self.tier = tier
        self.ttl = ttl
        self.hits = self.misses = self.rejected = self.stored = 0
        self._gathering: _Lookups | None = None

    async def fetch(self, key: str) -> CachedResponse | None:
        """The entry for `key`, with `stored_at` on this process's clock; None for a miss."""
        try:
            value = await self._get(entry_name(key))
        except TierUnavailable:
            self.misses += 1
            return None
        if value is None:
            self.misses += 1
            return None
        try:
            entry = decode(key, value)
        except UnusableEntry as unusable:
            self.rejected += 1
            log.warning("shared cache: an unusable entry (%s) is a miss", unusable.reason)
            return None
        age = max(0.0, time.time() - entry.stored_at)
        if self.ttl and age >= self.ttl:
            self.misses += 1
            return None
        self.hits += 1
        stored_at = trio.current_time() - age  # so the L1 copy expires when this one does
        return CachedResponse(entry.status, entry.headers, entry.chunks, stored_at)

    async def store(self, entries: Sequence[tuple[str, CachedResponse]]) -> None:
        """Write entries, each one SET expiring with the cache's TTL, in one pipeline; a
        failed write is only not counted."""
        import glide  # optional: only a gateway with a tier gets here

        now = time.time()
        ttl_ms = math.ceil(self.ttl * 1000)
        expiry = glide.ExpirySet(glide.ExpiryType.MILLSEC, ttl_ms) if ttl_ms else None
        batch = glide.Batch(is_atomic=False)
        for key, response in entries:
            batch.set(entry_name(key), encode(key, response, now), expiry=expiry)

        async def write(client: glide.GlideClient) -> list[object] | None:
            return await client.exec(batch, raise_on_error=False)

        try:
            answers = await self.tier.call(write)
        except TierUnavailable:
            return
        self.stored += sum(1 for answer in answers or () if answer == "OK")

    async def _get(self, name: str) -> bytes | None:
        """The value named `name`, through the MGET of this round's lookups."""
        lookups = self._gathering
        if lookups is not None:
            lookups.names.append(name)
            # Bounded by the first's budget already; this bound only guards against a bug.
            with trio.move_on_after(self.tier.settings.timeout * 2):
                await lookups.done.wait()
            if not lookups.done.is_set():
                raise TierUnavailable("the lookup did not end")
        else:
            lookups = self._gathering = _Lookups()
            lookups.names.append(name)
            # The others of this round are answered with ours: leaving early (the client
            # left) would strand them, and the tier's budget bounds the wait.
            with trio.CancelScope(shield=True):
                await trio.lowlevel.cancel_shielded_checkpoint()
                self._gathering = None
                await self._mget(lookups)
        if lookups.failed:
            raise TierUnavailable("the lookup failed")
        return lookups.values.get(name)

    async def _mget(self, lookups: _Lookups) -> None:
        names = list(dict.fromkeys(lookups.names))
        try:
            values = await self.tier.call(lambda client: client.mget(list(names)))
            lookups.values = dict(zip(names, values, strict=True))
        except TierUnavailable:
            lookups.failed = True
        finally:
            lookups.done.set()
