import math
import random
import string
from collections import Counter

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntonix.config import BALANCER_STRATEGIES
from ntonix.core.balancer import (
    STRATEGIES,
    Candidate,
    LeastConnections,
    PowerOfTwo,
    PrefixAffinity,
    Strategy,
    WeightedRoundRobin,
    affinity_key,
    make_strategy,
)


def _pool(**weights: int) -> list[Candidate]:
    return [Candidate(name, weight) for name, weight in weights.items()]


def _firsts(strategy: Strategy, candidates: list[Candidate], picks: int) -> str:
    return "".join(strategy.order(candidates)[0] for _ in range(picks))


candidate_lists = st.lists(
    st.builds(
        Candidate,
        name=st.text(string.ascii_lowercase, min_size=1, max_size=3),
        weight=st.integers(1, 5),
        in_flight=st.integers(0, 20),
    ),
    max_size=8,
    unique_by=lambda c: c.name,
)


def test_strategy_names_match_the_config() -> None:
    assert set(STRATEGIES) == set(BALANCER_STRATEGIES)
    with pytest.raises(ValueError, match="unknown balancer strategy"):
        make_strategy("random", random.Random(0))


@pytest.mark.parametrize("name", STRATEGIES)
@settings(max_examples=50)
@given(candidates=candidate_lists, key=st.none() | st.text(max_size=20), seed=st.integers(0, 99))
def test_every_strategy_orders_each_candidate_once(
    name: str, candidates: list[Candidate], key: str | None, seed: int
) -> None:
    strategy = make_strategy(name, random.Random(seed))
    for _ in range(3):
        order = strategy.order(candidates, affinity_key=key)
        assert sorted(order) == sorted(c.name for c in candidates)


def test_candidate_weight_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Candidate("a", 0)
    with pytest.raises(ValueError):
        Candidate("a", 1, in_flight=-1)


# --- weighted round-robin ------------------------------------------------------------------


@attrs.frozen
class Smooth:
    weights: dict[str, int]
    sequence: str


@pytest.mark.parametrize(
    "case",
    [
        Smooth({"a": 5, "b": 1, "c": 1}, "aabacaa" * 2),  # nginx's documented example
        Smooth({"a": 1, "b": 1, "c": 1}, "abcabc"),
        Smooth({"a": 3, "b": 1}, "aaba" * 2),
        Smooth({"a": 2, "b": 1, "c": 1}, "abca" * 2),
    ],
)
def test_wrr_interleaves_like_nginx(case: Smooth) -> None:
    balancer = WeightedRoundRobin()
    assert _firsts(balancer, _pool(**case.weights), len(case.sequence)) == case.sequence


def test_wrr_three_to_one_over_400_picks() -> None:
    counts = Counter(_firsts(WeightedRoundRobin(), _pool(a=3, b=1), 400))
    assert abs(counts["a"] - 300) <= 15
    assert abs(counts["b"] - 100) <= 5


def test_wrr_fails_over_to_whoever_is_due_next() -> None:
    balancer = WeightedRoundRobin()
    assert balancer.order(_pool(a=5, b=1, c=1)) == ["a", "b", "c"]
    assert balancer.order(_pool(a=5, b=1, c=1)) == ["a", "b", "c"]
    assert balancer.order(_pool(a=5, b=1, c=1)) == ["b", "c", "a"]


@given(st.lists(st.integers(1, 12), min_size=1, max_size=6), st.integers(1, 3))
def test_wrr_gives_each_backend_its_weight_per_cycle_and_is_never_a_pick_ahead(
    weights: list[int], cycles: int
) -> None:
    candidates = [Candidate(f"b{i}", weight) for i, weight in enumerate(weights)]
    total = sum(weights)
    balancer = WeightedRoundRobin()
    counts: Counter[str] = Counter()
    for picks in range(1, cycles * total + 1):
        counts[balancer.order(candidates)[0]] += 1
        # Smoothness: nobody is ever a whole pick ahead of its exact share (a bursty
        # a a a a a b c is, after five picks).
        for candidate in candidates:
            assert counts[candidate.name] * total < picks * candidate.weight + total
        if picks % total == 0:
            assert all(counts[c.name] == c.weight * picks // total for c in candidates)


def test_wrr_newcomers_start_fresh_and_leavers_are_forgotten() -> None:
    balancer = WeightedRoundRobin()
    _firsts(balancer, _pool(a=1, b=1, c=1), 4)
    # c is ejected, then returns: it starts at 0 again, like a backend never seen.
    _firsts(balancer, _pool(a=1, b=1), 1)
    fresh = WeightedRoundRobin()
    assert _firsts(balancer, _pool(x=2, y=1), 6) == _firsts(fresh, _pool(x=2, y=1), 6)


@settings(max_examples=50)
@given(
    st.lists(st.sets(st.sampled_from("abcd"), min_size=1), max_size=10),
    st.dictionaries(st.sampled_from("abcd"), st.integers(1, 6), min_size=4),
)
def test_wrr_shares_hold_after_the_candidate_set_changed(
    churn: list[set[str]], weights: dict[str, int]
) -> None:
    balancer = WeightedRoundRobin()
    for names in churn:
        balancer.order([Candidate(n, weights[n]) for n in sorted(names)])
    candidates = [Candidate(n, weights[n]) for n in "abcd"]
    counts = Counter(_firsts(balancer, candidates, 20 * sum(weights.values())))
    for candidate in candidates:
        assert abs(counts[candidate.name] - 20 * candidate.weight) <= len(candidates)


# --- least connections ---------------------------------------------------------------------


@attrs.frozen
class Least:
    candidates: tuple[Candidate, ...]
    first: str


@pytest.mark.parametrize(
    "case",
    [
        Least((Candidate("a", 1, 5), Candidate("b", 1, 1)), "b"),
        Least((Candidate("a", 1, 0), Candidate("b", 1, 3), Candidate("c", 1, 1)), "a"),
        # Relative to weight: 4/4 beats 2/1.
        Least((Candidate("a", 4, 4), Candidate("b", 1, 2)), "a"),
        Least((Candidate("a", 1, 2), Candidate("b", 4, 9)), "a"),
    ],
)
def test_least_connections_picks_the_least_loaded(case: Least) -> None:
    assert LeastConnections().order(case.candidates)[0] == case.first


def test_least_connections_sends_new_requests_away_from_pinned_streams() -> None:
    balancer = LeastConnections()
    order = balancer.order([Candidate("a", 1, 4), Candidate("b", 1, 0), Candidate("c", 1, 2)])
    assert order == ["b", "c", "a"]


def test_least_connections_spreads_ties_evenly() -> None:
    balancer = LeastConnections()
    idle = _pool(a=1, b=1, c=1)
    assert len(set(_firsts(balancer, idle, 3))) == 3  # takes turns, not always the first
    assert Counter(_firsts(balancer, idle, 300)) == {"a": 100, "b": 100, "c": 100}


def test_least_connections_ties_honour_weights() -> None:
    counts = Counter(_firsts(LeastConnections(), _pool(a=3, b=1), 400))
    assert counts == {"a": 300, "b": 100}


def test_least_connections_keeps_up_with_live_load() -> None:
    balancer = LeastConnections()
    in_flight = {"a": 0, "b": 0, "c": 0}
    for _ in range(30):
        pick = balancer.order([Candidate(n, 1, k) for n, k in in_flight.items()])[0]
        in_flight[pick] += 1
    assert in_flight == {"a": 10, "b": 10, "c": 10}


# --- power of two choices ------------------------------------------------------------------


@given(candidates=candidate_lists.filter(lambda cs: len(cs) >= 2), seed=st.integers(0, 999))
def test_p2c_never_picks_the_most_loaded(candidates: list[Candidate], seed: int) -> None:
    first = PowerOfTwo(random.Random(seed)).order(candidates)[0]
    loads = sorted(c.load for c in candidates)
    pick = next(c for c in candidates if c.name == first)
    # Of two distinct draws it keeps the lighter, so it can only reach the top load on a tie.
    assert pick.load < loads[-1] or loads[-2] == loads[-1]
    if len(candidates) == 2:
        assert pick.load == loads[0]


def test_p2c_is_deterministic_given_the_rng() -> None:
    pool = [Candidate(n, 1, i) for i, n in enumerate("abcdef")]
    one = [PowerOfTwo(random.Random(7)).order(pool) for _ in range(20)]
    two = [PowerOfTwo(random.Random(7)).order(pool) for _ in range(20)]
    assert one == two


def test_p2c_draws_by_weight() -> None:
    balancer = PowerOfTwo(random.Random(1))
    # Two idle backends: both are always drawn and the first drawn wins the tie.
    counts = Counter(_firsts(balancer, _pool(a=3, b=1), 4000))
    assert 2800 < counts["a"] < 3200
    # Many: the light one is rarely drawn at all.
    counts = Counter(_firsts(balancer, _pool(a=1, b=1, c=1, d=1, e=100), 2000))
    assert counts["e"] > 1900


# --- prefix affinity -----------------------------------------------------------------------


def _homes(balancer: PrefixAffinity, candidates: list[Candidate], keys: list[str]) -> list[str]:
    return [balancer.order(candidates, affinity_key=key)[0] for key in keys]


KEYS = [f"user: prompt number {i}" for i in range(2000)]


def test_affinity_sends_a_key_to_the_same_backend() -> None:
    pool = _pool(a=1, b=1, c=1)
    first = _homes(PrefixAffinity(), pool, KEYS[:50])
    assert _homes(PrefixAffinity(), pool, KEYS[:50]) == first  # stable across instances
    assert _homes(PrefixAffinity(), list(reversed(pool)), KEYS[:50]) == first


def test_affinity_spreads_keys_by_weight() -> None:
    counts = Counter(_homes(PrefixAffinity(), _pool(a=1, b=1, c=2), KEYS))
    assert all(350 < counts[name] < 650 for name in "ab")
    assert 800 < counts["c"] < 1200


def test_affinity_adding_a_backend_moves_only_its_share_of_keys() -> None:
    before = _homes(PrefixAffinity(), _pool(a=1, b=1, c=1, d=1), KEYS)
    after = _homes(PrefixAffinity(), _pool(a=1, b=1, c=1, d=1, e=1), KEYS)
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert all(new == "e" for _, new in moved)
    assert 0.1 < len(moved) / len(KEYS) < 0.3  # ~1/5


def test_affinity_removing_a_backend_moves_only_its_keys() -> None:
    before = _homes(PrefixAffinity(), _pool(a=1, b=1, c=1, d=1), KEYS)
    after = _homes(PrefixAffinity(), _pool(a=1, b=1, d=1), KEYS)
    for old, new in zip(before, after, strict=True):
        assert old == new or old == "c"


@pytest.mark.parametrize("weights", [{"a": 1, "b": 1, "c": 1, "d": 1}, {"a": 1, "b": 2, "c": 1}])
def test_affinity_bounds_the_load_of_a_hot_prefix(weights: dict[str, int]) -> None:
    balancer = PrefixAffinity()
    in_flight = dict.fromkeys(weights, 0)
    total_weight = sum(weights.values())
    for _ in range(200):
        candidates = [Candidate(n, weights[n], in_flight[n]) for n in weights]
        in_flight[balancer.order(candidates, affinity_key="the same system prompt")[0]] += 1
        total = sum(in_flight.values())
        for name, load in in_flight.items():
            assert load <= math.ceil(1.25 * total * weights[name] / total_weight) + 1
    assert min(in_flight.values()) > 0  # the hot prefix spilled over


def test_affinity_keeps_its_home_while_there_is_room() -> None:
    home = _homes(PrefixAffinity(), _pool(a=1, b=1, c=1), ["k"])[0]
    busy = [Candidate(n, 1, 1 if n == home else 0) for n in "abc"]
    # Capacity is ceil(1.25 * (1 + 1) / 3) = 1 request each: the home is full, so it spills.
    assert PrefixAffinity().order(busy, affinity_key="k")[0] != home
    loaded = [Candidate(n, 1, 3) for n in "abc"]
    assert PrefixAffinity().order(loaded, affinity_key="k")[0] == home


def test_affinity_without_a_key_is_least_connections() -> None:
    pool = [Candidate("a", 1, 3), Candidate("b", 1, 0), Candidate("c", 1, 1)]
    assert PrefixAffinity().order(pool) == ["b", "c", "a"]


@settings(max_examples=50)
@given(candidates=candidate_lists.filter(len), key=st.text(max_size=30))
def test_affinity_home_always_has_room(candidates: list[Candidate], key: str) -> None:
    first = PrefixAffinity().order(candidates, affinity_key=key)[0]
    pick = next(c for c in candidates if c.name == first)
    total = sum(c.in_flight for c in candidates) + 1
    weight = sum(c.weight for c in candidates)
    assert pick.in_flight < math.ceil(1.25 * total * pick.weight / weight)


# --- affinity keys -------------------------------------------------------------------------


@attrs.frozen
class Rendered:
    payload: dict[str, object]
    key: str | None


@pytest.mark.parametrize(
    "case",
    [
        Rendered(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ]
            },
            "system: Be brief.\nuser: Hi\n",
        ),
        Rendered(  # OpenAI content parts: the text counts, images do not
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is "},
                            {"type": "image_url", "image_url": {"url": "data:..."}},
                            {"type": "text", "text": "this?"},
                        ],
                    }
                ]
            },
            "user: What is this?\n",
        ),
        Rendered({"prompt": "Once upon a time"}, "Once upon a time"),
        Rendered({"prompt": ["a", "b"]}, "a\nb"),
        Rendered({"prompt": [1, 2, 3]}, "1 2 3"),
        Rendered({"system": "You are terse.", "prompt": "Why?"}, "system: You are terse.\nWhy?"),
        Rendered({"messages": []}, None),
        Rendered({"input": "embed me"}, None),
        Rendered({"prompt": None, "messages": "nope"}, None),
    ],
)
def test_affinity_key_renders_the_prompt(case: Rendered) -> None:
    assert affinity_key(case.payload) == case.key


def test_affinity_key_is_a_prefix() -> None:
    long = {"messages": [{"role": "user", "content": "x" * 1000}]}
    assert affinity_key(long) == "user: " + "x" * 250
    assert affinity_key(long, chars=8) == "user: xx"
    # Two conversations sharing a system prompt and first turn share the key.
    shared = [{"role": "system", "content": "s" * 300}]
    one = {"messages": [*shared, {"role": "user", "content": "one"}]}
    two = {"messages": [*shared, {"role": "user", "content": "two"}]}
    assert affinity_key(one) == affinity_key(two)


def test_loads_compare_as_the_exact_ratios_they_stand_for() -> None:
    third = Candidate("a", weight=9, in_flight=3)
    assert third.load == Candidate("b", weight=3, in_flight=1).load == Candidate("c", 6, 2).load
    big = 2**25
    # The nearest two unequal ratios below 2**26: still ordered, never equal.
    assert Candidate("d", big, big - 1).load > Candidate("e", big - 1, big - 2).load
    assert Candidate("f", 7, 2).load < Candidate("g", 10, 3).load
