"""Per-key limits held for the whole gateway: every worker and instance on one shared tier.

`requests_per_minute` is a sliding window: a sorted set of the admissions of the last 60 s, by
the Valkey server's clock, so no 60 s window ever holds more than the limit, whichever
instances they went through. `max_concurrent_per_key` is a sorted set of leases, each expiring
`[shared] lease` seconds after its worker last renewed it (every third of a lease), so a slot
of a worker that died is free again a lease later. Both are checked and taken in one Lua
script: a refusal takes nothing. The limits are the tenant's own (a named key's, else
`[auth]`'s), passed to the script with each admission. When the tier is down or slow the request
is counted in the worker, as without a tier (core/limits.py), and released where it was counted.
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
from ntonix.core.tenants import Tenant
from ntonix.shared_keys import limit_names
from ntonix.tier import SharedTier, TierUnavailable

log = logging.getLogger("ntonix.shared")

# KEYS: the client's admissions, its leases. ARGV: per minute, max concurrent, lease ms, the
# admission's id. Returns {1, admissions in the window} or {0, ms to wait, 1 for concurrency or 2
# for rate}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_minute, max_concurrent = tonumber(ARGV[1]), tonumber(ARGV[2])
local lease, admitted = tonumber(ARGV[3]), 0
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
  admitted = redis.call('ZCARD', KEYS[1])
end
if max_concurrent > 0 then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], lease)
end
return {1, admitted}
"""
# KEYS: the client's admissions. Returns how many of them are in the last 60 s.
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. (now - 60000), '+inf')
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
    """An admitted request: who (the tenant, whose limits it was counted against), where it was
    counted, so that its release goes there too, and what its x-ratelimit-* headers say."""

    tenant: Tenant
    shared: bool = False  # counted on the tier, else in this worker
    lease: str = ""  # the concurrency slot's id in the tier, if it took one
    # Requests left in the tenant's minute, and seconds until it is whole again; None
    # without a per-minute limit.
    remaining: tuple[int, float] | None = None

    @property
    def limited(self) -> bool:
        return bool(self.tenant.requests_per_minute or self.tenant.max_concurrent)


class KeyLimits:
    """Admission by tenant: on the tier when there is one, else (or when it fails) here."""

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
            self._count_script = Script(_COUNT)  # type: ignore[no-untyped-call]

    async def admit(self, tenant: Tenant, now: float) -> tuple[Verdict, Ticket]:
        """Take one request for `tenant`, within its own limits; an allowed one must be
        `release`d when it ends. A tenant without request limits is not counted at all."""
        if not (tenant.requests_per_minute or tenant.max_concurrent):
            return Verdict(True), Ticket(tenant)
        if self.tier is not None:
            try:
                return await self._admit_shared(self.tier, tenant)
            except TierUnavailable:
                self.counted_locally += 1
        local, identity = self.local, tenant.identity
        per_minute = tenant.requests_per_minute
        verdict = local.admit(
            identity, now, per_minute=per_minute, max_concurrent=tenant.max_concurrent
        )
        remaining = local.remaining(identity, now, per_minute=per_minute) if per_minute else None
        return verdict, Ticket(tenant, remaining=remaining)

    async def remaining(self, tenant: Tenant, now: float) -> tuple[int, float] | None:
        """What `tenant` has left of its minute, taking nothing (for a request refused before
        its admission: over its tokens)."""
        per_minute = tenant.requests_per_minute
        if not per_minute:
            return None
        if self.tier is not None:
            rate, _ = _names(tenant)
            script = self._count_script
            with contextlib.suppress(TierUnavailable):
                count = await self.tier.call(
                    lambda valkey: valkey.invoke_script(script, keys=[rate], args=[])
                )
                if isinstance(count, int):
                    return per_minute - count, 60.0 if count else 0.0
        return self.local.remaining(tenant.identity, now, per_minute=per_minute)

    def release(self, ticket: Ticket) -> None:
        if not ticket.limited:
            return
        if not ticket.shared:
            self.local.release(ticket.tenant.identity)
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

    async def _admit_shared(self, tier: SharedTier, tenant: Tenant) -> tuple[Verdict, Ticket]:
        per_minute, max_concurrent = tenant.requests_per_minute, tenant.max_concurrent
        rate, slots = _names(tenant)
        lease = f"{self._worker}:{next(self._ids)}"
        args = [str(per_minute), str(max_concurrent), str(self._lease_ms), lease]
        script = self._admit_script
        answer = await tier.call(
            lambda valkey: valkey.invoke_script(script, keys=[rate, slots], args=args)
        )
        if not isinstance(answer, list) or len(answer) < 2:
            raise TierUnavailable(f"unexpected answer from the admission script: {answer!r}")
        if answer[0] == 1:
            # The window is whole again a minute after this admission, its newest.
            remaining = (per_minute - int(answer[1]), 60.0) if per_minute else None
            if not max_concurrent:
                return Verdict(True), Ticket(tenant, shared=True, remaining=remaining)
            self._held[lease] = slots
            return Verdict(True), Ticket(tenant, shared=True, lease=lease, remaining=remaining)
        wait_ms, why = int(answer[1]), answer[2]
        reason = (
            f"more than {max_concurrent} requests in flight"
            if why == 1
            else f"more than {per_minute} requests per minute"
        )
        remaining = (0, wait_ms / 1000) if why == 2 else None
        return Verdict(False, wait_ms / 1000, reason), Ticket(tenant, remaining=remaining)

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


def _names(tenant: Tenant) -> tuple[str, str]:
    return limit_names(
        hashlib.sha256(tenant.identity.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    )
