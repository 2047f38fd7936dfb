"""Budgets that keep one client address from taking the front door: its open connections, and
the HTTP/2 streams it resets (the "rapid reset" attack, CVE-2023-44487).

Invariants:
- `ClientConnections`: a key never holds more than `limit` slots; each `take` that returned
  True is matched by one `release`; a key with no slot left is forgotten, so memory follows the
  connections open, not the addresses ever seen.
- `ResetBudget`: a leaky bucket per key, `limit` resets per `window` seconds. `spend` adds one
  and says whether the key is now over budget; the level never exceeds twice the limit, so a
  key that stops resetting is back within budget at most `window` seconds later. Memory stays
  bounded: past `max_keys`, keys whose bucket has drained are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

MAX_KEYS = 100_000


class ClientConnections:
    """Open connections per client key, at most `limit` each; 0 turns the limit off."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def take(self, key: str) -> bool:
        """A slot for one more connection of `key`; False at its limit (nothing taken)."""
        held = self._open.get(key, 0)
        if self.limit and held >= self.limit:
            return False
        self._open[key] = held + 1
        return True

    def release(self, key: str) -> None:
        held = self._open.get(key, 0)
        if held <= 1:
            self._open.pop(key, None)
        else:
            self._open[key] = held - 1

    def open(self, key: str) -> int:
        return self._open.get(key, 0)

    @property
    def clients(self) -> int:
        """Keys holding at least one slot."""
        return len(self._open)


@attrs.define
class _Bucket:
    level: float
    at: float


class ResetBudget:
    """`limit` stream resets per `window` seconds per key, as a leaky bucket."""

    def __init__(self, limit: int, window: float, *, max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self.window = window
        self._rate = limit / window
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def spend(self, key: str, now: float) -> bool:
        """One reset by `key`; True when `key` is now over its budget."""
        bucket = self._buckets.get(key)
        if bucket is None:
            self._forget_drained(now)
            bucket = self._buckets[key] = _Bucket(0.0, now)
        self._drain(bucket, now)
        # Capped: the penalty for a flood lasts one window after it stops, not its length.
        bucket.level = min(bucket.level + 1.0, 2.0 * self.limit)
        self._buckets.move_to_end(key)
        return bucket.level > self.limit

    def exhausted(self, key: str, now: float) -> bool:
        """Whether `key` is over its budget now (spending nothing)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return False
        self._drain(bucket, now)
        return bucket.level > self.limit

    def level(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        self._drain(bucket, now)
        return bucket.level

    def __len__(self) -> int:
        return len(self._buckets)

    def _drain(self, bucket: _Bucket, now: float) -> None:
        bucket.level = max(0.0, bucket.level - (now - bucket.at) * self._rate)
        bucket.at = now

    def _forget_drained(self, now: float) -> None:
        # Oldest first; a bucket still holding resets is kept unless there is no other way to
        # stay within max_keys (then the oldest goes: memory wins over one stale penalty).
        excess = len(self._buckets) + 1 - self._max_keys
        if excess <= 0:
            return
        for key in list(self._buckets):
            if excess <= 0:
                return
            bucket = self._buckets[key]
            self._drain(bucket, now)
            if bucket.level == 0.0:
                del self._buckets[key]
                excess -= 1
        while excess > 0:
            self._buckets.popitem(last=False)
            excess -= 1
