from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.balancer import RoundRobin


@given(st.lists(st.integers(), min_size=1, max_size=8, unique=True), st.integers(1, 50))
def test_round_robin_spreads_first_choice_evenly(candidates: list[int], rounds: int) -> None:
    balancer = RoundRobin()
    firsts = Counter(balancer.order(candidates)[0] for _ in range(rounds * len(candidates)))
    assert set(firsts.values()) == {rounds}


def test_round_robin_orders_every_candidate_once() -> None:
    balancer = RoundRobin()
    assert balancer.order([]) == []
    for _ in range(5):
        assert sorted(balancer.order(["a", "b", "c"])) == ["a", "b", "c"]
