"""Token limits held for the whole gateway: every worker and instance on one shared tier.

A key's minute is a hash of the tokens charged in each second (by the Valkey server's clock),
its day one counter per UTC day; both expire on their own. A charge adds to both in one script
when a response ends; the check before a request reads both in another, which also drops the
seconds that left the minute. A second's charges count until that second has been over for
60 s, so no 60 s window holds more than the key was let use. The decision is the one the
worker makes on its own windows (core/token_limits.py `assess`), here on the tier's figures.

Every response is charged to this worker's windows too: when the tier is down or slow a check
goes by them (what this worker served), as without a tier, and a charge the tier missed is
only not shared.
"""

from __future__ import annotations

import contextlib
import hashlib

import trio

from ntonix.core.token_limits import DAY, MINUTE, Standing, TokenLimits, assess
from ntonix.shared_keys import token_names
from ntonix.tier import SharedTier, TierUnavailable

# KEYS: the minute's hash, the day's counter. ARGV: tokens. The day outlives its date by a day
# at most (a clock a little behind still finds it).
_CHARGE = """
local t = redis.call('TIME')
redis.call('HINCRBY', KEYS[1], t[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], 62)
redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], 172800)
return 0
"""
# KEYS: the same. Returns {now in ms, the day's tokens, then second, tokens for each second
# still in the minute}.
_STANDING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now, tonumber(redis.call('GET', KEYS[2]) or '0')}
local seconds = redis.call('HGETALL', KEYS[1])
for i = 1, #seconds, 2 do
  local second = tonumber(seconds[i])
  if (second + 1) * 1000 <= now - 60000 then
    redis.call('HDEL', KEYS[1], seconds[i])
  else
    table.insert(out, second)
    table.insert(out, tonumber(seconds[i + 1]))
  end
end
return out
"""


class SharedTokens:
    """The tier's side of the token windows: `charge` after a response, `standing` before."""

    def __init__(self, tier: SharedTier, nursery: trio.Nursery) -> None:
        from glide import Script  # optional: only a gateway with a tier gets here

        self.tier = tier
        self._nursery = nursery
        self._charge_script = Script(_CHARGE)  # type: ignore[no-untyped-call]
        self._standing_script = Script(_STANDING)  # type: ignore[no-untyped-call]

    def charge(self, identity: str, tokens: int, wall: float) -> None:
        """Add `tokens` to the key's windows, off the request path (a charge is never waited
        for: the response has ended)."""
        if tokens > 0:
            self._nursery.start_soon(self._charge, _names(identity, wall), tokens)

    async def standing(
        self, identity: str, limits: TokenLimits, now: float, wall: float
    ) -> Standing:
        """Where the key stands on the tier (TierUnavailable when it cannot tell); `now` is
        the caller's clock, which the tier's seconds are mapped onto."""
        script, names = self._standing_script, _names(identity, wall)
        answer = await self.tier.call(
            lambda valkey: valkey.invoke_script(script, keys=list(names), args=[])
        )
        if not isinstance(answer, list) or len(answer) < 2 or len(answer) % 2:
            raise TierUnavailable(f"unexpected answer from the token script: {answer!r}")
        server_now = int(answer[0]) / 1000
        pairs = [(int(answer[i]), int(answer[i + 1])) for i in range(2, len(answer), 2)]
        # A second's charges are taken as made at its end: counted the longest they may.
        charges = sorted((now - (server_now - (second + 1)), tokens) for second, tokens in pairs)
        charges = [(at, tokens) for at, tokens in charges if at > now - MINUTE]
        minute = sum(tokens for _, tokens in charges)
        return assess(charges, minute, int(answer[1]), limits, now, wall)

    async def _charge(self, names: tuple[str, str], tokens: int) -> None:
        script = self._charge_script
        # Lost, it is still in this worker's windows.
        with contextlib.suppress(TierUnavailable):
            await self.tier.call(
                lambda valkey: valkey.invoke_script(script, keys=list(names), args=[str(tokens)])
            )


def _names(identity: str, wall: float) -> tuple[str, str]:
    client = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return token_names(client, int(wall // DAY))
