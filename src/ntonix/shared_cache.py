"""Level 2 of the response cache: entries in Valkey, shared by every worker and instance.

One entry is one value (core/shared_entry.py) written by one SET with the cache's TTL, so a
reader sees a whole entry or none. Key names hold the cache key (a SHA-256 of the request and
its tenant scope), never request text. A value that does not decode (cut short, altered,
foreign) is a miss, counted as `rejected`. Every call is a tier call: within the budget, and a
failed or skipped one is a miss too; the request goes on with L1 alone.

A call to Valkey costs the gateway about as much CPU as a tenth of a request, so calls are
shared: the lookups that arrive within one scheduling round go out as one script call (per
key: the entry, or else the key's flight lease, shared_flights.py), and the writer sends the
entries waiting for it as one pipeline of SETs.
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
from ntonix.shared_flights import LOOKUP, Follow, Lead, SharedFlights
from ntonix.shared_keys import entry_name, lease_name
from ntonix.tier import SharedTier, TierUnavailable

if TYPE_CHECKING:
    import glide

log = logging.getLogger("ntonix.shared")


class _Lookups:
    """Keys asked for in one scheduling round, answered by one script call."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}  # key -> the flight id it would lead under
        self.answers: dict[str, list[object]] = {}
        self.failed = False
        self.done = trio.Event()


class SharedCache:
    """Reads and writes of cached responses in the tier, with their counters."""

    def __init__(self, tier: SharedTier, ttl: float, flights: SharedFlights) -> None:
        self.tier = tier
        self.ttl = ttl
        self.flights = flights
        self.hits = self.misses = self.rejected = self.stored = 0
        self._gathering: _Lookups | None = None
        from glide import Script  # optional: only a gateway with a tier gets here

        self._script = Script(LOOKUP)  # type: ignore[no-untyped-call]

    async def fetch(self, key: str) -> CachedResponse | Lead | Follow | None:
        """The entry for `key` (with `stored_at` on this process's clock); on a miss, whether
        this worker leads the key's flight or follows another's; None when the tier cannot
        tell (a miss, and a flight of this worker alone)."""
        try:
            answer, lead_id = await self._lookup(key)
        except TierUnavailable:
            self.misses += 1
            return None
        if answer[0] != 1:
            self.misses += 1
            return Lead(lead_id) if answer[0] == 2 else Follow(_text(answer[1]))
        value = answer[1]
        assert isinstance(value, bytes)
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
        return CachedResponse(entry.status, entry.headers, entry.chunks, stored_at, entry.usage)

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

    async def _lookup(self, key: str) -> tuple[list[object], str]:
        """The script's answer for `key`, from the call of this round's lookups, and the id
        it would lead under."""
        lookups = self._gathering
        if lookups is not None:
            lookups.ids.setdefault(key, self.flights.new_id())
            # Bounded by the first's budget already; this bound only guards against a bug.
            with trio.move_on_after(self.tier.settings.timeout * 2):
                await lookups.done.wait()
            if not lookups.done.is_set():
                raise TierUnavailable("the lookup did not end")
        else:
            lookups = self._gathering = _Lookups()
            lookups.ids[key] = self.flights.new_id()
            # The others of this round are answered with ours: leaving early (the client
            # left) would strand them, and the tier's budget bounds the wait.
            with trio.CancelScope(shield=True):
                await trio.lowlevel.cancel_shielded_checkpoint()
                self._gathering = None
                await self._run(lookups)
        if lookups.failed:
            raise TierUnavailable("the lookup failed")
        return lookups.answers[key], lookups.ids[key]

    async def _run(self, lookups: _Lookups) -> None:
        keys = list(lookups.ids)
        names = [name for key in keys for name in (entry_name(key), lease_name(key))]
        args = [str(self.flights.lease_ms), *lookups.ids.values()]
        script = self._script
        try:
            answers = await self.tier.call(
                lambda client: client.invoke_script(script, keys=names, args=args)
            )
            if not isinstance(answers, list) or len(answers) != len(keys):
                raise TierUnavailable(f"unexpected answer from the lookup script: {answers!r}")
            lookups.answers = dict(zip(keys, answers, strict=True))
        except TierUnavailable:
            lookups.failed = True
        finally:
            lookups.done.set()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
