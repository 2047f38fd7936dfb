"""Token limits per key: `tokens_per_minute` over a sliding 60 s, `tokens_per_day` since
00:00 UTC.

Invariants: tokens are charged when a response ends (its cost is not known before), so a key
is refused only once its window already holds its limit, and the one request that crosses it is
served whole; a refusal says how long until enough of the window frees for the key to be under
its limit again; a charge older than 60 s no longer counts against the minute, and a day's count
is dropped when the next day begins. The minute is on the caller's monotonic clock, the day on
the wall clock.

One process keeps its own windows (`TokenWindows`); the shared tier keeps the same two for the
whole gateway (ntonix.shared_tokens: a key's minute as tokens per second, its day as one
counter). Either way `assess` decides from a key's minute charges and its day's tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import attrs

MINUTE = 60.0
DAY = 86_400


@attrs.frozen
class TokenLimits:
    per_minute: int = 0  # 0: no limit
    per_day: int = 0


@attrs.frozen
class Standing:
    """Where a key stands against its token limits now, and what the x-ratelimit headers say."""

    allowed: bool
    retry_after: float  # seconds, when not allowed
    reason: str
    limit: int  # the per-minute limit, or the daily one when there is none per minute
    remaining: int
    reset: float  # seconds until that window holds nothing of this key's


class _Key:
    __slots__ = ("charges", "day", "day_tokens", "minute_tokens")

    def __init__(self) -> None:
        self.charges: deque[tuple[float, int]] = deque()
        self.minute_tokens = 0
        self.day = -1
        self.day_tokens = 0


class TokenWindows:
    """Every token-limited key's minute and day (named keys only: their number is the config's)."""

    def __init__(self) -> None:
        self._keys: dict[str, _Key] = {}

    def charge(self, key: str, tokens: int, now: float, wall: float) -> None:
        entry = self._entry(key, now, wall)
        if tokens <= 0:
            return
        entry.charges.append((now, tokens))
        entry.minute_tokens += tokens
        entry.day_tokens += tokens

    def used(self, key: str, now: float, wall: float) -> tuple[int, int]:
        """Tokens in the key's minute and in its day."""
        entry = self._entry(key, now, wall)
        return entry.minute_tokens, entry.day_tokens

    def standing(self, key: str, limits: TokenLimits, now: float, wall: float) -> Standing:
        """May `key` start a request now, and what its headers say."""
        entry = self._entry(key, now, wall)
        return assess(entry.charges, entry.minute_tokens, entry.day_tokens, limits, now, wall)

    def _entry(self, key: str, now: float, wall: float) -> _Key:
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key()
        charges = entry.charges
        while charges and charges[0][0] <= now - MINUTE:
            entry.minute_tokens -= charges.popleft()[1]
        day = int(wall // DAY)
        if entry.day != day:
            entry.day, entry.day_tokens = day, 0
        return entry


def assess(
    charges: Sequence[tuple[float, int]],
    minute_tokens: int,
    day_tokens: int,
    limits: TokenLimits,
    now: float,
    wall: float,
) -> Standing:
    """A key's standing from its minute's charges ((time, tokens), oldest first, none older
    than 60 s before `now`), their sum, and its day's tokens: this worker's windows or the
    shared tier's."""
    to_midnight = DAY - wall % DAY
    if limits.per_day and day_tokens >= limits.per_day:
        return Standing(
            False,
            to_midnight,
            f"more than {limits.per_day} tokens today",
            limits.per_minute or limits.per_day,
            0,
            to_midnight,
        )
    if limits.per_minute:
        reset = charges[-1][0] + MINUTE - now if charges else 0.0
        remaining = max(0, limits.per_minute - minute_tokens)
        if minute_tokens >= limits.per_minute:
            wait = _until_under(charges, minute_tokens, limits.per_minute, now)
            reason = f"more than {limits.per_minute} tokens per minute"
            return Standing(False, wait, reason, limits.per_minute, 0, reset)
        return Standing(True, 0.0, "", limits.per_minute, remaining, reset)
    remaining = max(0, limits.per_day - day_tokens)
    return Standing(True, 0.0, "", limits.per_day, remaining, to_midnight if day_tokens else 0.0)


def _until_under(charges: Iterable[tuple[float, int]], used: int, limit: int, now: float) -> float:
    for at, tokens in charges:
        used -= tokens
        if used < limit:
            return at + MINUTE - now
    return 0.0


def ratelimit_headers(
    requests: tuple[int, int, float] | None, tokens: Standing | None
) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers: `requests` is (limit, remaining, seconds to reset)."""
    headers = []
    if requests is not None:
        limit, remaining, reset = requests
        headers += _triple(b"requests", limit, remaining, reset)
    if tokens is not None:
        headers += _triple(b"tokens", tokens.limit, tokens.remaining, tokens.reset)
    return headers


def _triple(what: bytes, limit: int, remaining: int, reset: float) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit-" + what, str(limit).encode()),
        (b"x-ratelimit-remaining-" + what, str(max(0, remaining)).encode()),
        (b"x-ratelimit-reset-" + what, duration(reset).encode()),
    ]


def duration(seconds: float) -> str:
    """A wait as OpenAI writes it: "20ms", "1.5s", "6m0s", "1h2m3s"."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole_minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(whole_minutes), 60)
    rest_text = f"{round(rest, 3):g}s"
    if hours:
        return f"{hours}h{minutes}m{rest_text}"
    if minutes:
        return f"{minutes}m{rest_text}"
    return rest_text
