"""Token windows per key: the minute slides, the day turns at midnight UTC, refusals say when."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.ledger import UsageBook
from ntonix.core.token_limits import MINUTE, TokenLimits, TokenWindows, duration, ratelimit_headers
from ntonix.core.usage import Usage

NOON = 1_765_022_400.0  # 2025-12-06 12:00 UTC
PER_MINUTE = TokenLimits(per_minute=300)


def test_three_answers_of_a_hundred_fill_a_minute_of_300_until_the_first_slides_out() -> None:
    windows = TokenWindows()
    for at in (0.0, 10.0, 20.0):
        assert windows.standing("k", PER_MINUTE, at, NOON + at).allowed
        windows.charge("k", 100, at, NOON + at)
    refused = windows.standing("k", PER_MINUTE, 30.0, NOON + 30)
    assert not refused.allowed and refused.remaining == 0
    assert refused.retry_after == 30.0  # the charge at 0 leaves the window at 60
    assert refused.reset == 50.0  # the last one leaves at 80
    assert "300 tokens per minute" in refused.reason
    again = windows.standing("k", PER_MINUTE, 60.0, NOON + 60)
    assert again.allowed and again.remaining == 100


def test_the_day_refuses_until_midnight_utc_and_then_starts_over() -> None:
    windows = TokenWindows()
    limits = TokenLimits(per_day=1000)
    windows.charge("k", 1200, 0.0, NOON)
    refused = windows.standing("k", limits, 30.0, NOON + 100)
    assert not refused.allowed and refused.retry_after == 12 * 3600 - 100
    assert windows.standing("k", limits, 40.0, NOON + 12 * 3600).allowed
    assert windows.used("k", 40.0, NOON + 12 * 3600) == (1200, 0)  # the minute still holds it


def test_keys_are_apart() -> None:
    windows = TokenWindows()
    windows.charge("greedy", 500, 0.0, NOON)
    assert not windows.standing("greedy", PER_MINUTE, 1.0, NOON).allowed
    assert windows.standing("polite", PER_MINUTE, 1.0, NOON).allowed


@given(
    st.lists(st.tuples(st.floats(0, 5), st.integers(0, 200)), max_size=30),
    st.integers(1, 600),
)
def test_a_key_is_refused_exactly_while_its_last_minute_holds_its_limit(
    charges: list[tuple[float, int]], limit: int
) -> None:
    windows, now, history = TokenWindows(), 0.0, []
    limits = TokenLimits(per_minute=limit)
    for gap, tokens in charges:
        now += gap * 10
        used = sum(t for at, t in history if at > now - MINUTE)
        standing = windows.standing("k", limits, now, NOON + now)
        assert standing.allowed == (used < limit)
        assert standing.remaining == max(0, limit - used)
        if not standing.allowed:
            later = now + standing.retry_after + 1e-9  # (float rounding at the boundary)
            assert sum(t for at, t in history if at > later - MINUTE) < limit
        windows.charge("k", tokens, now, NOON + now)
        history.append((now, tokens))


def test_headers_are_openais() -> None:
    standing = TokenWindows().standing("k", PER_MINUTE, 0.0, NOON)
    headers = dict(ratelimit_headers((60, 59, 1.0), standing))
    assert headers == {
        b"x-ratelimit-limit-requests": b"60",
        b"x-ratelimit-remaining-requests": b"59",
        b"x-ratelimit-reset-requests": b"1s",
        b"x-ratelimit-limit-tokens": b"300",
        b"x-ratelimit-remaining-tokens": b"300",
        b"x-ratelimit-reset-tokens": b"0ms",
    }
    assert [duration(s) for s in (0.02, 1.5, 360, 3723)] == ["20ms", "1.5s", "6m0s", "1h2m3s"]


def test_the_ledger_keeps_kinds_apart_and_forgets_the_minute() -> None:
    book = UsageBook()
    book.add("a", "m", Usage(10, 20), cached=False, now=0.0, wall=NOON)
    book.add("a", "m", Usage(3, 4, estimated=True), cached=False, now=30.0, wall=NOON)
    book.add("a", "m", Usage(10, 20), cached=True, now=59.5, wall=NOON)
    figures = book.figures(59.9)
    assert figures.total == {
        ("a", "m", "prompt"): 13,
        ("a", "m", "completion"): 24,
        ("a", "m", "estimated"): 7,
        ("a", "m", "cached"): 30,
    }
    assert book.figures(61.0).minute[("a", "m", "prompt")] == 3  # the first slid out
    assert set(figures.days) == {"2025-12-06"}
