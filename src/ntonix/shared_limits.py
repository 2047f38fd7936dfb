"""Per-key limits held for the whole gateway: every worker and instance on one shared tier.

`requests_per_minute` is a sliding window: a sorted set of the admissions of the last 60 s, by
the Valkey server's clock, so no 60 s window ever holds more than the limit, whichever
instances they went through. `max_concurrent_per_key` is a sorted set of leases, each expiring
`[shared] lease` seconds after its worker last renewed it (every third of a lease), so a slot
of a worker that died is free again a lease later. Both are checked and taken in one Lua
script: a refusal takes nothing. When the tier is down or slow the request is counted in the
worker, as without a tier (core/limits.py), and released where it was counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import secrets
from collections import defaultdict

import attrs
import trio

from ntonix.core.limits import ClientLimits, Verdict
from ntonix.shared_keys import limit_names
from ntonix.tier import SharedTier, TierUnavailable

log = logging.getLogger("ntonix.shared")

# KEYS: the client's admissions, its leases. ARGV: per minute, max concurrent, lease ms, the
# admission's id. Returns {1} or {0, ms to wait, 1 for concurrency or 2 for rate}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_minute, max_concurrent = tonumber(ARGV[1]), tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_concurrent then
    return {0, 1000, 1}
  end
end
if per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[1]) >= per_minute then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, math.max(1, tonumber(oldest[2]) + 60000 - now), 2}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], 60000)
end
if max_concurrent > 0 then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], lease)
end
return {1}
"""
# KEYS: the client's leases. ARGV: lease ms, then the leases to extend (gone ones stay gone).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease)
return 0
"""


@attrs.frozen
class Ticket:
    """An admitted request: where it was counted, so that its release goes there too."""

    client: str
    shared: bool = False  # counted on the tier, else in this worker
    lease: str = ""  # the concurrency slot's id in the tier, if it took one


class KeyLimits:
    """Admission by client key: on the tier when there is one, else (or when it fails) here."""

    def __init__(
        self,
        local: ClientLimits,
        tier: SharedTier | None = None,
        nursery: trio.Nursery | None = None,
        lease: float = 10.0,
    ) -> None:
        self.local = local
        self.tier = tier
        self._nursery = nursery
        self._lease_ms = math.ceil(lease * 1000)
        self._worker = secrets.token_hex(8)
        self._ids = itertools.count()
        self._held: dict[str, str] = {}  # lease id -> the client's lease set
        self.counted_locally = 0
        if tier is not None:
            from glide import Script  # optional: only a gateway with a tier gets here

            # glide sends a script's SHA and loads it only when the server lacks it.
            self._admit_script = Script(_ADMIT)  # type: ignore[no-untyped-call]
            self._renew_script = Script(_RENEW)  # type: ignore[no-untyped-call]

    @property
    def active(self) -> bool:
        return self.local.active

    async def admit(self, client: str, now: float) -> tuple[Verdict, Ticket]:
        """Take one request for `client`; an allowed one must be `release`d when it ends."""
        if self.tier is not None:
            try:
                return await self._admit_shared(self.tier, client)
            except TierUnavailable:
                self.counted_locally += 1
        return self.local.admit(client, now), Ticket(client)

    def release(self, ticket: Ticket) -> None:
        if not ticket.shared:
            self.local.release(ticket.client)
            return
        slots = self._held.pop(ticket.lease, None) if ticket.lease else None
        if slots is not None and self._nursery is not None:
            # Off the request path; if it fails, the lease is no longer renewed and expires.
            self._nursery.start_soon(self._free, slots, ticket.lease)

    async def renew_forever(self) -> None:
        """Extend every lease this worker holds, every third of a lease."""
        while True:
            await trio.sleep(self._lease_ms / 3000)
            by_client: defaultdict[str, list[str]] = defaultdict(list)
            for lease, slots in self._held.items():
                by_client[slots].append(lease)
            for slots, leases in by_client.items():
                await self._renew(slots, leases)

    async def _admit_shared(self, tier: SharedTier, client: str) -> tuple[Verdict, Ticket]:
        local = self.local
        name = hashlib.sha256(client.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        rate, slots = limit_names(name)
        lease = f"{self._worker}:{next(self._ids)}"
        args = [str(local.per_minute), str(local.max_concurrent), str(self._lease_ms), lease]
        script = self._admit_script
        answer = await tier.call(
            lambda valkey: valkey.invoke_script(script, keys=[rate, slots], args=args)
        )
        if not isinstance(answer, list) or not answer:
            raise TierUnavailable(f"unexpected answer from the admission script: {answer!r}")
        if answer[0] == 1:
            if not local.max_concurrent:
                return Verdict(True), Ticket(client, shared=True)
            self._held[lease] = slots
            return Verdict(True), Ticket(client, shared=True, lease=lease)
        wait_ms, why = int(answer[1]), answer[2]
        reason = (
            f"more than {local.max_concurrent} requests in flight"
            if why == 1
            else f"more than {local.per_minute} requests per minute"
        )
        return Verdict(False, wait_ms / 1000, reason), Ticket(client)

    async def _free(self, slots: str, lease: str) -> None:
        assert self.tier is not None
        with contextlib.suppress(TierUnavailable):
            await self.tier.call(lambda valkey: valkey.zrem(slots, [lease]))

    async def _renew(self, slots: str, leases: list[str]) -> None:
        assert self.tier is not None
        script = self._renew_script
        args = [str(self._lease_ms), *leases]
        # A failed round is tried again at the next; past a lease, the slots are gone.
        with contextlib.suppress(TierUnavailable):
            await self.tier.call(
                lambda valkey: valkey.invoke_script(script, keys=[slots], args=args)
            )
