"""The fair queue's order: interactive before batch (until it ages), keys share by weight,
each key in arrival order, one key alone is first come, first served."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.fair_queue import FairQueue


def serve(queue: FairQueue[str], now: float = 0.0) -> str:
    """Give one freed slot: the first in order takes it."""
    entry = queue.order(now)[0]
    queue.remove(entry)
    queue.served(entry.key, entry.weight)
    return entry.item


def test_one_key_alone_is_first_come_first_served() -> None:
    queue: FairQueue[str] = FairQueue(aging=10)
    for n in range(5):
        queue.push(f"r{n}", "a", weight=1, batch=False, now=n)
    assert [serve(queue) for _ in range(5)] == ["r0", "r1", "r2", "r3", "r4"]


def test_a_key_with_a_backlog_delays_another_keys_request_by_one_turn_at_most() -> None:
    queue: FairQueue[str] = FairQueue(aging=10)
    for n in range(1000):
        queue.push(f"a{n}", "a", weight=1, batch=False, now=0.0)
    served = [serve(queue) for _ in range(3)]
    queue.push("b0", "b", weight=1, batch=False, now=1.0)
    assert serve(queue) == "b0"
    assert served == ["a0", "a1", "a2"]
    assert serve(queue) == "a3"


def test_keys_share_slots_by_weight() -> None:
    queue: FairQueue[str] = FairQueue(aging=10)
    for _ in range(100):
        queue.push("a", "a", weight=3, batch=False, now=0.0)
        queue.push("b", "b", weight=1, batch=False, now=0.0)
    assert Counter(serve(queue) for _ in range(40)) == {"a": 30, "b": 10}


def test_batch_waits_behind_interactive_until_it_ages() -> None:
    queue: FairQueue[str] = FairQueue(aging=10)
    queue.push("batch", "nightly", weight=5, batch=True, now=0.0)
    for n in range(3):
        queue.push(f"chat{n}", "app", weight=1, batch=False, now=1.0)
    assert serve(queue, now=2.0) == "chat0"
    assert serve(queue, now=10.0) == "batch"  # waited 10 s: it goes with the interactive ones
    assert serve(queue, now=10.0) == "chat1"


def test_a_request_whose_client_left_frees_its_place_at_once() -> None:
    queue: FairQueue[str] = FairQueue(aging=10)
    entries = [queue.push(f"r{n}", "a", weight=1, batch=False, now=0.0) for n in range(3)]
    queue.remove(entries[0])
    queue.remove(entries[0])  # twice is harmless
    assert len(queue) == 2
    assert [e.item for e in queue.order(0.0)] == ["r1", "r2"]


requests = st.lists(
    st.tuples(st.sampled_from("abc"), st.integers(1, 4), st.booleans(), st.floats(0, 30)),
    max_size=40,
)


@given(requests, st.integers(0, 40))
def test_the_order_keeps_every_waiter_each_key_in_arrival_order_and_classes_apart(
    pushed: list[tuple[str, int, bool, float]], served: int
) -> None:
    queue: FairQueue[int] = FairQueue(aging=10)
    weights: dict[str, int] = {}
    batches: dict[str, bool] = {}  # a key's priority and weight are its own, as a tenant's are
    for index, (key, weight, batch, at) in enumerate(sorted(pushed, key=lambda p: p[3])):
        weight, batch = weights.setdefault(key, weight), batches.setdefault(key, batch)
        queue.push(index, key, weight=weight, batch=batch, now=at)
    now = 20.0
    for _ in range(min(served, len(pushed))):
        serve(queue, now)
    order = queue.order(now)
    assert len(order) == len(queue) == len(pushed) - min(served, len(pushed))
    for key in "abc":
        items = [entry.item for entry in order if entry.key == key]
        assert items == sorted(items)
    late = [entry.batch and now - entry.arrived < 10 for entry in order]
    assert late == sorted(late)  # every interactive (or aged) one before every young batch one
