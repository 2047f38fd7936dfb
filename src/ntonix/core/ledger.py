"""The usage ledger: tokens per key and model, since start, over the last minute and today.

Invariants: every token counted goes in exactly one kind: `prompt` and `completion` for what a
backend generated (and `estimated`, a subset of those two, for the part that was estimated),
`cached` for what a cache hit or a coalesced request served without generating. Keys are
tenants' names ("anonymous" for every client without a named key), so the rows are bounded by
the config's keys times the models served. The minute is the last 60 s on the caller's
monotonic clock, one bucket per second; the day is the UTC date of the wall clock.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter

import attrs

from ntonix.core.usage import Usage

KINDS = ("prompt", "completion", "cached")
MINUTE_SECONDS = 60

Row = tuple[str, str, str]  # (key, model, kind)


@attrs.frozen
class UsageFigures:
    """What a ledger holds, as plain counters that sum across workers (core/figures.py)."""

    total: Counter[Row] = attrs.field(factory=Counter)  # since start; kinds and "estimated"
    minute: Counter[Row] = attrs.field(factory=Counter)  # the last 60 s
    days: dict[str, Counter[Row]] = attrs.field(factory=dict)  # "YYYY-MM-DD" (UTC) -> rows


def utc_date(wall: float) -> str:
    return _formatted_day(int(wall // 86400))


# Every request of a day reuses it: formatting a date was most of counting a response's tokens.
@functools.lru_cache(maxsize=2)
def _formatted_day(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


class UsageBook:
    """One worker's token tallies."""

    def __init__(self) -> None:
        self.total: Counter[Row] = Counter()
        self._seconds: dict[int, Counter[Row]] = {}
        self._second = -math.inf  # the latest bucket's: older ones are dropped when it moves
        self._date = ""
        self._today: Counter[Row] = Counter()

    def add(
        self, key: str, model: str, usage: Usage, *, cached: bool, now: float, wall: float
    ) -> None:
        """Count one response's tokens: generated, or served from the cache."""
        if cached:
            rows = {(key, model, "cached"): usage.total}
        else:
            rows = {
                (key, model, "prompt"): usage.prompt,
                (key, model, "completion"): usage.completion,
            }
            if usage.estimated:
                rows[(key, model, "estimated")] = usage.total
        counted = [(row, count) for row, count in rows.items() if count > 0]
        if not counted:
            return
        second = math.floor(now)
        bucket = self._seconds.get(second)
        if bucket is None:
            bucket = self._seconds[second] = Counter()
            if second > self._second:
                self._second = second
                for old in [s for s in self._seconds if s <= second - MINUTE_SECONDS]:
                    del self._seconds[old]
        date = utc_date(wall)
        if date != self._date:
            self._date, self._today = date, Counter()
        # Plain additions: Counter.update of a mapping costs several times more per row.
        total, today = self.total, self._today
        for row, count in counted:
            total[row] += count
            bucket[row] += count
            today[row] += count

    def figures(self, now: float) -> UsageFigures:
        current = math.floor(now)
        minute: Counter[Row] = Counter()
        for second, rows in self._seconds.items():
            if second > current - MINUTE_SECONDS:
                minute.update(rows)
        days = {self._date: Counter(self._today)} if self._date else {}
        return UsageFigures(Counter(self.total), minute, days)
