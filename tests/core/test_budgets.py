from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.budgets import ClientConnections, ResetBudget


def test_one_client_holds_at_most_limit_connections_and_others_are_unaffected() -> None:
    connections = ClientConnections(limit=2)
    assert connections.take("a") and connections.take("a")
    assert not connections.take("a")
    assert connections.open("a") == 2
    assert connections.take("b")
    connections.release("a")
    assert connections.take("a")


def test_a_client_without_connections_is_forgotten() -> None:
    connections = ClientConnections(limit=5)
    for _ in range(3):
        connections.take("a")
    for _ in range(3):
        connections.release("a")
    assert connections.clients == 0
    connections.release("a")  # one release too many changes nothing
    assert connections.open("a") == 0


def test_limit_zero_turns_the_connection_limit_off() -> None:
    connections = ClientConnections(limit=0)
    assert all(connections.take("a") for _ in range(1000))


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=200))
def test_connection_counts_never_pass_the_limit(moves: list[tuple[str, bool]]) -> None:
    connections = ClientConnections(limit=3)
    held = {"a": 0, "b": 0, "c": 0}
    for key, take in moves:
        if take:
            if connections.take(key):
                held[key] += 1
        elif held[key]:
            connections.release(key)
            held[key] -= 1
        assert connections.open(key) == held[key] <= 3


def test_reset_budget_allows_limit_resets_then_is_over() -> None:
    budget = ResetBudget(limit=100, window=10.0)
    assert not any(budget.spend("conn", now=0.0) for _ in range(100))
    assert budget.spend("conn", now=0.0)
    assert budget.exhausted("conn", now=0.0)


def test_resets_spread_over_time_stay_within_budget() -> None:
    budget = ResetBudget(limit=100, window=10.0)
    # Ten a second is the rate that drains: a client cancelling that often is never cut off.
    assert not any(budget.spend("a", now=i / 10) for i in range(10_000))


def test_a_flood_is_forgiven_one_window_after_it_stops() -> None:
    budget = ResetBudget(limit=100, window=10.0)
    for _ in range(100_000):
        budget.spend("a", now=0.0)
    assert budget.level("a", now=0.0) == 200.0  # capped at twice the limit
    assert budget.exhausted("a", now=9.9)
    assert not budget.exhausted("a", now=10.0)


def test_one_keys_resets_do_not_spend_anothers_budget() -> None:
    budget = ResetBudget(limit=2, window=1.0)
    for _ in range(3):
        budget.spend("a", 0.0)
    assert budget.exhausted("a", 0.0)
    assert not budget.exhausted("b", 0.0)
    assert not budget.spend("b", 0.0)


def test_reset_budget_memory_is_bounded_drained_keys_first() -> None:
    budget = ResetBudget(limit=10, window=1.0, max_keys=3)
    for _ in range(11):
        budget.spend("flooder", now=0.0)
    budget.spend("x", now=0.0)
    budget.spend("y", now=0.0)
    budget.spend("z", now=5.0)  # x and y have drained by now; the flooder has too, oldest
    assert len(budget) == 3
    budget.spend("w", now=5.0)
    assert len(budget) == 3
