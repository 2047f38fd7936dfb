"""Backend selection.

Invariant: selection only orders candidates it is given; whether a backend may take traffic is
decided elsewhere, so a strategy never needs to know about health.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class RoundRobin:
    """Plain round-robin: each call starts one further along the list."""

    def __init__(self) -> None:
        self._turn = 0

    def order(self, candidates: Sequence[T]) -> list[T]:
        """All candidates, rotated so that successive calls spread the first choice evenly."""
        if not candidates:
            return []
        start = self._turn % len(candidates)
        self._turn += 1
        return [*candidates[start:], *candidates[:start]]
