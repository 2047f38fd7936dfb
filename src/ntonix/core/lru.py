"""LRU bookkeeping of cached responses: recency, expiry, eviction and byte accounting.

Invariants, after every operation: at most `max_entries` entries and `max_bytes` bytes are held;
the byte count equals the sum of the held entries' sizes; an entry older than `ttl` is never
returned (ttl 0 means entries never expire); an entry larger than `max_bytes` is refused and
changes nothing but the `rejected` counter. Every operation is O(1) amortised.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import attrs

from ntonix.core.usage import Usage

Header = tuple[bytes, bytes]


def _size_of(response: CachedResponse) -> int:
    body = sum(len(chunk) for chunk in response.chunks)
    return body + sum(len(name) + len(value) for name, value in response.headers)


@attrs.frozen
class CachedResponse:
    """A complete 200 response as it was sent: headers, and the body as its chunks (SSE events,
    NDJSON lines, or one whole body), so a hit replays the same framing."""

    status: int
    headers: tuple[Header, ...]
    chunks: tuple[bytes, ...]
    stored_at: float  # when the response completed, on the gateway's clock
    usage: Usage | None = None  # the tokens it took to generate, served again by each hit
    size: int = attrs.field(init=False, default=attrs.Factory(_size_of, takes_self=True))

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@attrs.frozen
class LruStatistics:
    """A snapshot of the cache's size and counters (counters only grow, even across clear)."""

    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int  # entries dropped to make room for another
    expirations: int  # entries dropped because they outlived the ttl
    rejected: int  # entries refused because they alone exceed max_bytes


class ResponseLru:
    """Cached responses by key, least recently used first out.

    Time comes in as `now` (seconds on a monotonic clock). Expired entries are dropped lazily:
    by `get`, by `put` (before anything live is evicted) and by `purge_expired`.
    """

    def __init__(self, *, max_entries: int, max_bytes: int, ttl: float) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be > 0 (got {max_entries})")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be > 0 (got {max_bytes})")
        if not ttl >= 0:
            raise ValueError(f"ttl must be >= 0 (got {ttl})")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        # Least recently used first.
        self._recency: OrderedDict[str, CachedResponse] = OrderedDict()
        # Same keys, oldest stored first: with one ttl and a monotonic clock that is also
        # soonest-expiring first, so purging looks only at the front.
        self._deadlines: OrderedDict[str, float] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0
        self._rejected = 0

    def get(self, key: str, now: float) -> CachedResponse | None:
        """The live entry for `key`, now the most recently used; None (a miss) otherwise."""
        response = self._recency.get(key)
        if response is not None and self._deadlines[key] <= now:
            self._remove(key)
            self._expirations += 1
            response = None
        if response is None:
            self._misses += 1
            return None
        self._recency.move_to_end(key)
        self._hits += 1
        return response

    def put(self, key: str, response: CachedResponse, now: float) -> list[str]:
        """Store `response` under `key` (replacing any entry there); returns the keys evicted
        to make room, least recently used first. Refused, returning [], if it alone is too big.
        """
        if response.size > self.max_bytes:
            self._rejected += 1
            return []
        if key in self._recency:
            self._remove(key)
        self.purge_expired(now)
        evicted = []
        while self._recency and (
            len(self._recency) >= self.max_entries or self._bytes + response.size > self.max_bytes
        ):
            oldest = next(iter(self._recency))
            self._remove(oldest)
            evicted.append(oldest)
        self._evictions += len(evicted)
        self._recency[key] = response
        self._deadlines[key] = now + self.ttl if self.ttl > 0 else math.inf
        self._bytes += response.size
        return evicted

    def delete(self, key: str) -> bool:
        """Drop the entry for `key`; whether there was one."""
        if key not in self._recency:
            return False
        self._remove(key)
        return True

    def clear(self) -> int:
        """Drop every entry (counters keep counting); how many there were."""
        count = len(self._recency)
        self._recency.clear()
        self._deadlines.clear()
        self._bytes = 0
        return count

    def purge_expired(self, now: float) -> int:
        """Drop the entries that outlived the ttl; how many there were."""
        purged = 0
        while self._deadlines:
            key, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                break
            self._remove(key)
            purged += 1
        self._expirations += purged
        return purged

    def keys(self) -> tuple[str, ...]:
        """The keys held, least recently used first (expired ones included until dropped)."""
        return tuple(self._recency)

    def statistics(self) -> LruStatistics:
        return LruStatistics(
            entries=len(self._recency),
            bytes=self._bytes,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expirations=self._expirations,
            rejected=self._rejected,
        )

    def _remove(self, key: str) -> None:
        self._bytes -= self._recency.pop(key).size
        del self._deadlines[key]
