"""The order in which queued requests are offered a freed backend slot.

Invariants: an interactive request is offered a slot before any batch one, except that a batch
request queued for `aging` seconds or more counts as interactive, so batch work is never starved
for good. Within a class, keys share slots by weight, not requests: start-time fair queuing over
keys, where each key's requests keep their arrival order and a key's next request carries the
tag max(virtual time, the key's last finish) + 1/weight. A key with a thousand queued requests
therefore delays another key's next request by at most one turn of every other queued key.
Removing a waiter (its client left) changes no other waiter's tag. With one key, the order is
first come, first served.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")

# Past this many keys remembered, those that have nothing queued and no head start left are
# forgotten (forgetting such a key changes no tag).
_MAX_IDLE_KEYS = 4096


class Entry(Generic[T]):
    """One queued request."""

    __slots__ = ("arrived", "batch", "item", "key", "seq", "weight")

    def __init__(self, item: T, key: str, weight: int, batch: bool, arrived: float, seq: int):
        self.item = item
        self.key = key
        self.weight = weight
        self.batch = batch
        self.arrived = arrived
        self.seq = seq


class FairQueue(Generic[T]):
    def __init__(self, aging: float) -> None:
        self.aging = aging
        self._queues: dict[str, deque[Entry[T]]] = {}
        self._finish: dict[str, float] = {}  # per key: the virtual time its last turn ended
        self._virtual = 0.0  # the start tag of the last request served
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, item: T, key: str, *, weight: int, batch: bool, now: float) -> Entry[T]:
        entry = Entry(item, key, max(1, weight), batch, now, next(self._seq))
        self._queues.setdefault(key, deque()).append(entry)
        self._size += 1
        return entry

    def remove(self, entry: Entry[T]) -> None:
        queue = self._queues.get(entry.key)
        if queue is None or entry not in queue:
            return
        queue.remove(entry)
        self._size -= 1
        if not queue:
            del self._queues[entry.key]

    def order(self, now: float) -> list[Entry[T]]:
        """Every queued request, in the order a freed slot is offered to them."""
        ranked = []
        for key, queue in self._queues.items():
            start = max(self._virtual, self._finish.get(key, self._virtual))
            for turn, entry in enumerate(queue):
                late = entry.batch and now - entry.arrived < self.aging
                ranked.append((late, start + turn / entry.weight, entry.seq, entry))
        ranked.sort(key=lambda rank: rank[:3])
        return [rank[3] for rank in ranked]

    def served(self, key: str, weight: int) -> None:
        """`key` took a slot (from the queue or straight away): its next turn comes later."""
        start = max(self._virtual, self._finish.get(key, self._virtual))
        self._finish[key] = start + 1 / max(1, weight)
        self._virtual = start
        if len(self._finish) > _MAX_IDLE_KEYS:
            self._finish = {
                k: finish
                for k, finish in self._finish.items()
                if k in self._queues or finish > self._virtual
            }
