"""Level 2 of the response cache: entries in Valkey, shared by every worker and instance.

One entry is one value (core/shared_entry.py) written by one SET with the cache's TTL, so a
reader sees a whole entry or none. Key names hold the cache key (a SHA-256 of the request and
its tenant scope), never request text. A value that does not decode (cut short, altered,
foreign) is a miss, counted as `rejected`. Every call is a tier call: within the budget, and a
failed or skipped one is a miss too; the request goes on with L1 alone.
"""

from __future__ import annotations

import logging
import math
import time
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


class SharedCache:
    """Reads and writes of cached responses in the tier, with their counters."""

    def __init__(self, tier: SharedTier, ttl: float) -> None:
        self.tier = tier
        self.ttl = ttl
        self.hits = self.misses = self.rejected = self.stored = 0

    async def fetch(self, key: str) -> CachedResponse | None:
        """The entry for `key`, with `stored_at` on this process's clock; None for a miss."""
        name = entry_name(key)
        try:
            value = await self.tier.call(lambda client: client.get(name))
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

    async def store(self, key: str, response: CachedResponse) -> None:
        """Write one entry, expiring with the cache's TTL; a failed write is only counted."""
        value = encode(key, response, time.time())
        name = entry_name(key)
        ttl_ms = math.ceil(self.ttl * 1000) if self.ttl else 0

        async def write(client: glide.GlideClient) -> object:
            if ttl_ms:
                return await client.custom_command(["SET", name, value, "PX", str(ttl_ms)])
            return await client.set(name, value)

        try:
            await self.tier.call(write)
        except TierUnavailable:
            return
        self.stored += 1
