"""least-loaded, slow start and residency: pure decisions over readings and an injected clock."""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.balancer import Candidate, LeastConnections, Signals, make_strategy
from ntonix.core.engines import LoadedModel, LoadReading
from ntonix.core.least_loaded import LeastLoaded, drain_factors, load_score, scores
from ntonix.core.signals import LoadBook, ours_counted


def pick(strategy: LeastLoaded, *candidates: Candidate) -> str:
    return strategy.order(candidates)[0]


@given(
    st.lists(
        st.lists(st.tuples(st.integers(1, 5), st.integers(0, 9)), min_size=3, max_size=3),
        min_size=1,
        max_size=30,
    )
)
def test_without_signals_it_is_least_connections_turn_for_turn(
    rounds: list[list[tuple[int, int]]],
) -> None:
    loaded, connections = LeastLoaded(), LeastConnections()
    for round_ in rounds:
        candidates = [Candidate(f"b{i}", w, n, Signals()) for i, (w, n) in enumerate(round_)]
        assert loaded.order(candidates) == connections.order(candidates)


def test_make_strategy_knows_least_loaded() -> None:
    import random

    assert isinstance(make_strategy("least-loaded", random.Random(1)), LeastLoaded)


def test_a_queued_request_weighs_more_than_a_running_one() -> None:
    queued = Candidate("a", signals=Signals(load=2, waiting=1))
    busy = Candidate("b", signals=Signals(load=2))
    assert pick(LeastLoaded(), queued, busy) == "b"
    full = Candidate("c", signals=Signals(load=2, capacity=2))
    half = Candidate("d", signals=Signals(load=1, capacity=2, kv_usage=0.9))
    assert pick(LeastLoaded(), full, half) == "d"
    assert load_score(full) == 2.0 > load_score(half) == 1.45


def test_kv_use_breaks_an_otherwise_equal_load() -> None:
    roomy = Candidate("a", signals=Signals(load=1, capacity=4, kv_usage=0.1))
    packed = Candidate("b", signals=Signals(load=1, capacity=4, kv_usage=0.8))
    assert [pick(LeastLoaded(), packed, roomy) for _ in range(4)] == ["a"] * 4


def test_equal_loads_share_by_smooth_weighted_round_robin() -> None:
    strategy = LeastLoaded()
    a = Candidate("a", weight=1, signals=Signals(load=0, capacity=8))
    b = Candidate("b", weight=1, signals=Signals(load=0, capacity=8))
    assert [pick(strategy, a, b) for _ in range(4)] == ["a", "b", "a", "b"]


def book_with(**readings: LoadReading) -> LoadBook:
    book = LoadBook(interval=1.0, slow_start=30.0)
    book.reconcile(readings, now=0.0)
    for name, reading in readings.items():
        book.record(name, reading, taken_at=0.0, received_at=0.0)
    return book


def test_a_burst_between_two_readings_spreads_instead_of_herding() -> None:
    # Both engines said "idle" at t=0; 10 requests arrive before the next reading.
    book = book_with(a=LoadReading("vllm", 0, 0), b=LoadReading("vllm", 0, 0))
    strategy, in_flight = LeastLoaded(), Counter[str]()
    for _ in range(10):
        candidates = [Candidate(n, 1, in_flight[n]) for n in "ab"]
        in_flight[pick(strategy, *book.annotate(candidates, "m", 0.5))] += 1
    assert in_flight == {"a": 5, "b": 5}


def test_load_from_other_clients_steers_new_requests_away() -> None:
    # A's engine runs 2 requests that are not ours: new ones go to B until B carries as much.
    book = book_with(a=LoadReading("vllm", 0, 2), b=LoadReading("vllm", 0, 0))
    strategy, in_flight = LeastLoaded(), Counter[str]()
    picks = []
    for _ in range(2):
        candidates = [Candidate(n, 1, in_flight[n]) for n in "ab"]
        picks.append(pick(strategy, *book.annotate(candidates, "m", 0.5)))
        in_flight[picks[-1]] += 1
    assert picks == ["b", "b"]


def test_our_requests_counted_by_the_reading_are_not_counted_twice() -> None:
    book = LoadBook(interval=1.0)
    book.reconcile(["a"], now=0.0)
    for ticket, sent_at in enumerate((0.0, 0.1, 0.2, 0.25, 0.4)):
        book.sent("a", ticket, now=sent_at)
    book.finished("a", 0, now=0.05)  # before the reading was asked for: not in it
    book.finished("a", 1, now=0.22)  # during the reading: it may have counted it
    # Asked at 0.2, answered at 0.3: at any one moment between, 1 or 2 of ours were on the
    # engine (tickets 1 and 2 until 0.22, then 2 alone, then 2 and 3 from 0.25); ticket 4 went
    # out after the answer. With nothing learned before, the engine's 5 held 2 of ours.
    assert ours_counted([(0.0, 0.05), (0.1, 0.22), (0.2, None), (0.25, None)], 0.2, 0.3) == (1, 2)
    book.record("a", LoadReading("vllm", 1, 4), taken_at=0.2, received_at=0.3)
    book.finished("a", 2, now=0.35)
    assert book.signals("a", in_flight=2, model=None, now=0.5).load == 3 + 2


def test_a_reading_that_straddles_a_finish_and_a_resend_counts_one_of_them() -> None:
    # Two requests of others on A, and one of ours, which finishes at 1.02; our client sends
    # its next at 1.03. The engine's snapshot (2 + 1 = 3) was taken between 1.0 and 1.05.
    book = LoadBook(interval=1.0)
    book.reconcile(["a"], now=0.0)
    book.sent("a", 1, now=0.5)
    book.record("a", LoadReading("vllm", 0, 3), taken_at=0.9, received_at=0.9)
    book.finished("a", 1, now=1.02)
    book.sent("a", 2, now=1.03)
    book.record("a", LoadReading("vllm", 1, 2), taken_at=1.0, received_at=1.05)
    # Counting both as seen by the engine would leave 1 for the others and say 2 in all.
    assert book.signals("a", in_flight=1, model=None, now=1.1).load == 3


@given(
    spans=st.lists(
        st.tuples(st.integers(0, 15), st.one_of(st.none(), st.integers(1, 20))), max_size=8
    ),
    snapshot=st.integers(5, 15),
    others=st.integers(0, 5),
)
def test_with_the_others_unchanged_the_estimate_is_exact_whenever_the_snapshot_was_taken(
    spans: list[tuple[int, int | None]], snapshot: int, others: int
) -> None:
    # Our requests are (sent, finished) in tenths of a second; the reading is asked for at 0.5
    # and answered at 1.5, the engine took its snapshot at `snapshot` (between), and the other
    # clients ran `others` requests throughout.
    spans = [(sent, None if done is None else max(done, sent + 1)) for sent, done in spans]
    book = LoadBook(interval=10.0)
    book.reconcile(["a"], now=0.0)
    book.record("a", LoadReading("vllm", 0, others), taken_at=0.0, received_at=0.0)
    for ticket, (sent, done) in enumerate(spans):
        book.sent("a", ticket, now=sent / 10)
        if done is not None and done <= 15:
            book.finished("a", ticket, now=done / 10)
    on_engine = sum(sent <= snapshot and (done is None or snapshot < done) for sent, done in spans)
    book.record("a", LoadReading("vllm", 0, others + on_engine), taken_at=0.5, received_at=1.5)
    in_flight = sum(sent <= 15 and (done is None or done > 15) for sent, done in spans)
    assert book.signals("a", in_flight, None, now=1.5).load == others + in_flight


def test_a_request_that_finished_while_the_reading_travelled_leaves_no_phantom() -> None:
    book = LoadBook(interval=1.0)
    book.reconcile(["a"], now=0.0)
    book.sent("a", 7, now=0.0)
    book.finished("a", 7, now=0.15)  # the engine counted it at 0.12; the answer came at 0.2
    book.record("a", LoadReading("vllm", 0, 1), taken_at=0.1, received_at=0.2)
    assert book.signals("a", in_flight=0, model=None, now=0.3).load == 0


def test_a_stale_reading_falls_back_to_local_counts() -> None:
    book = book_with(a=LoadReading("vllm", 9, 9))
    assert book.signals("a", 1, None, now=3.0).load == 18 - 0 + 1
    status = book.status("a", 1, now=3.5)
    assert status.stale and status.estimated_load is None and status.age == 3.5
    assert book.signals("a", 1, None, now=3.5).load is None


def test_a_failed_read_keeps_the_last_reading_until_it_is_stale() -> None:
    book = book_with(a=LoadReading("vllm", 0, 1))
    book.fail("a", "metrics read timed out")
    status = book.status("a", 0, now=1.0)
    assert status.error == "metrics read timed out" and not status.stale
    assert status.reading == LoadReading("vllm", 0, 1)


def test_a_slow_backend_pays_for_its_latency_and_near_ties_go_to_the_faster() -> None:
    fast = Candidate("fast", signals=Signals(load=3, ttfb=0.1))
    slow = Candidate("slow", signals=Signals(load=0, ttfb=0.3))  # idle, but 3x slower
    assert scores([fast, slow]) == pytest.approx({"fast": 4.0, "slow": 1.0 + 2.0})
    assert pick(LeastLoaded(), fast, slow) == "slow"  # three running on fast cost more
    fast = Candidate("fast", signals=Signals(load=2, ttfb=0.1))
    assert pick(LeastLoaded(), fast, slow) == "fast"
    # 25% slower is no surcharge, but on an equal load the faster one wins every time.
    a = Candidate("a", signals=Signals(load=0, capacity=4, ttfb=0.10))
    b = Candidate("b", signals=Signals(load=0, capacity=4, ttfb=0.125))
    assert scores([a, b])["b"] == scores([a, b])["a"]
    assert [pick(LeastLoaded(), b, a) for _ in range(3)] == ["a"] * 3


def test_near_saturation_the_queue_forms_where_it_drains_sooner() -> None:
    # Both full (4 of 4 slots); our requests hold the slow one 3x as long, so each request
    # queued there waits about as long as three queued on the fast one.
    def queue_eight(hold: dict[str, float | None]) -> Counter[str]:
        strategy, queued = LeastLoaded(), Counter[str]()
        for _ in range(8):
            candidates = [
                Candidate(n, signals=Signals(load=4 + queued[n], capacity=4, hold=hold[n]))
                for n in ("fast", "slow")
            ]
            queued[pick(strategy, *candidates)] += 1
        return queued

    assert queue_eight({"fast": 0.35, "slow": 1.05}) == {"fast": 6, "slow": 2}
    # Before any of ours finished there (no hold time yet), the queues grow evenly.
    assert queue_eight({"fast": 0.35, "slow": None}) == {"fast": 4, "slow": 4}


def test_the_hold_time_is_a_moving_average_of_sent_to_finished_whatever_the_outcome() -> None:
    book = LoadBook(interval=1.0)
    book.reconcile(["a"], now=0.0)
    book.sent("a", 1, now=0.0)
    book.finished("a", 1, now=1.0)
    book.sent("a", 2, now=1.0)
    book.finished("a", 2, now=1.5)  # a client that left early frees the slot early too
    assert book.signals("a", 0, None, now=2.0).hold == pytest.approx(1.0 + 0.2 * (0.5 - 1.0))
    assert book.status("a", 0, now=2.0).hold == pytest.approx(0.9)
    assert drain_factors(
        [Candidate("x", signals=Signals(hold=0.1)), Candidate("y", signals=Signals(hold=2.0))]
    ) == {"x": 1.0, "y": 8.0}  # capped


# --- Slow start ------------------------------------------------------------------------------


def shares_over_time(times: list[float], slow_start: float = 30.0) -> list[float]:
    """B's share of 20 requests placed at each time, after B's circuit closed at t=0."""
    book = LoadBook(interval=1.0, slow_start=slow_start)
    book.reconcile(["a", "b"], now=-60.0)
    book.note_closed("b", False, now=-10.0)
    book.note_closed("b", True, now=0.0)
    strategy = LeastLoaded()
    shares = []
    for now in times:
        in_flight = Counter[str]()
        for _ in range(20):
            candidates = [Candidate(n, 1, in_flight[n]) for n in "ab"]
            in_flight[pick(strategy, *book.annotate(candidates, None, now))] += 1
        shares.append(in_flight["b"] / 20)
    return shares


def test_slow_start_ramps_a_recovered_backend_from_a_tenth_to_its_full_share() -> None:
    shares = shares_over_time([0.0, 7.5, 15.0, 22.5, 30.0, 60.0])
    assert shares[0] <= 0.1  # at 10% of its weight: about 1 in 11
    assert shares == sorted(shares)  # growing all along
    assert 0.2 <= shares[2] <= 0.4  # halfway: weight 0.55, a share of about 0.35
    assert shares[-2] == shares[-1] == 0.5  # full weight after slow_start seconds


def test_a_backend_added_by_a_reload_ramps_but_those_at_start_do_not() -> None:
    book = LoadBook(slow_start=30.0)
    book.reconcile(["a"], now=0.0)
    book.reconcile(["a", "b"], now=100.0)
    assert book.ramp("a", 100.0) == 1.0
    assert book.ramp("b", 100.0) == pytest.approx(0.1)
    assert book.ramp("b", 115.0) == pytest.approx(0.55)
    assert book.ramp("b", 130.0) == 1.0


def test_slow_start_zero_is_off() -> None:
    book = LoadBook(slow_start=0.0)
    book.reconcile(["a"], now=0.0)
    book.note_closed("a", False, now=1.0)
    book.note_closed("a", True, now=2.0)
    assert book.ramp("a", 2.0) == 1.0


# --- Residency -------------------------------------------------------------------------------


def ollama(*models: str) -> LoadReading:
    return LoadReading("ollama", models=tuple(LoadedModel(m) for m in models))


def test_no_cold_load_while_a_warm_backend_has_room() -> None:
    book = book_with(warm=ollama("llama3:latest"), cold=ollama("qwen2.5:latest"))
    strategy, in_flight = LeastLoaded(), Counter[str]()
    for _ in range(6):
        candidates = [Candidate(n, 1, in_flight[n]) for n in ("cold", "warm")]
        in_flight[pick(strategy, *book.annotate(candidates, "llama3", 0.5))] += 1
    # The warm one is 5 requests busier, and still no model is loaded a second time.
    assert in_flight == {"warm": 6}


def test_a_cold_backend_is_used_only_when_no_warm_one_has_room() -> None:
    warm = Candidate("warm", signals=Signals(load=2, capacity=2, warm=True))
    cold = Candidate("cold", signals=Signals(load=0, capacity=2, warm=False))
    assert LeastLoaded().order([warm, cold]) == ["cold", "warm"]
    roomy = Candidate("warm", signals=Signals(load=1, capacity=2, warm=True))
    assert LeastLoaded().order([roomy, cold]) == ["warm", "cold"]


def test_among_warm_backends_the_load_decides() -> None:
    a = Candidate("a", signals=Signals(load=3, warm=True))
    b = Candidate("b", signals=Signals(load=1, warm=True))
    c = Candidate("c", signals=Signals(load=0, warm=False))
    assert LeastLoaded().order([a, b, c]) == ["b", "a", "c"]


def test_an_engine_that_queues_shows_its_capacity() -> None:
    book = book_with(a=LoadReading("vllm", 0, 3))
    assert book.signals("a", 0, None, now=0.1).capacity is None
    book.record("a", LoadReading("vllm", 2, 4), taken_at=1.0, received_at=1.0)
    book.record("a", LoadReading("vllm", 0, 1), taken_at=2.0, received_at=2.0)
    assert book.signals("a", 0, None, now=2.1).capacity == 4
    assert book.status("a", 0, now=2.1).capacity == 4


def test_until_it_queues_a_backend_is_taken_to_be_like_its_peers() -> None:
    book = book_with(a=LoadReading("vllm", 1, 2), b=LoadReading("vllm", 0, 1))
    book.record("c", LoadReading("tgi", 0, 1), taken_at=0.0, received_at=0.0)
    assert book.signals("b", 0, None, now=0.1).capacity == 2
    book.record(
        "b", LoadReading("vllm", 0, 3), taken_at=0.2, received_at=0.2
    )  # runs 3 without a queue
    assert book.signals("b", 0, None, now=0.3).capacity == 3
    assert book.signals("a", 0, None, now=0.3).capacity == 2


def test_residency_outlives_a_stale_queue_reading() -> None:
    book = book_with(a=ollama("llama3:latest"))
    assert book.signals("a", 0, "qwen", now=5.0).warm is False  # stale for the queue...
    assert book.signals("a", 0, "qwen", now=5.0).load is None
    assert book.signals("a", 0, "qwen", now=31.0).warm is None  # ...and, much later, for this


def test_the_kv_cache_tells_a_capacity_before_any_queue() -> None:
    book = book_with(a=LoadReading("vllm", 0, 3, kv_usage=0.25))
    assert book.signals("a", 0, None, now=0.1).capacity == 12
    book.record(
        "a", LoadReading("vllm", 0, 0, kv_usage=0.0), taken_at=0.5, received_at=0.5
    )  # idle: remembered
    assert book.signals("a", 0, None, now=0.6).capacity == 12
    book.record(
        "a", LoadReading("vllm", 1, 4, kv_usage=0.9), taken_at=1.0, received_at=1.0
    )  # a queue: learned
    assert book.signals("a", 0, None, now=1.1).capacity == 4


def test_kv_use_follows_the_requests_that_finished_or_started_since_the_reading() -> None:
    book = LoadBook(interval=1.0)
    book.reconcile(["a"], now=0.0)
    for ticket in (1, 2):
        book.sent("a", ticket, now=0.0)
    book.record("a", LoadReading("vllm", 0, 2, kv_usage=0.5), taken_at=0.1, received_at=0.1)
    assert book.signals("a", in_flight=2, model=None, now=0.2).kv_usage == 0.5
    book.finished("a", 1, now=0.3)
    book.finished("a", 2, now=0.3)
    assert book.signals("a", in_flight=0, model=None, now=0.4).kv_usage == 0.0
    assert book.signals("a", in_flight=6, model=None, now=0.4).kv_usage == 1.0
