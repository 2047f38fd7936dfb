import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.lru import CachedResponse, LruStatistics, ResponseLru

HEADERS = ((b"content-type", b"application/json"),)  # 28 bytes


def _response(body_size: int, *, stored_at: float = 0.0) -> CachedResponse:
    """A response of exactly `body_size` bytes (no headers), in chunks of up to 4 bytes."""
    body = b"x" * body_size
    return CachedResponse(
        200, (), tuple(body[i : i + 4] for i in range(0, body_size, 4)), stored_at
    )


def test_size_counts_chunks_and_headers() -> None:
    response = CachedResponse(200, HEADERS, (b"data: a\n\n", b"data: [DONE]\n\n"), 1.0)
    assert response.size == 28 + 9 + 14
    assert response.body == b"data: a\n\ndata: [DONE]\n\n"


def test_cached_response_is_immutable() -> None:
    response = _response(3)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        response.size = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    "settings",
    [
        {"max_entries": 0, "max_bytes": 1, "ttl": 1.0},
        {"max_entries": 1, "max_bytes": 0, "ttl": 1.0},
        {"max_entries": 1, "max_bytes": 1, "ttl": -1.0},
        {"max_entries": 1, "max_bytes": 1, "ttl": math.nan},
    ],
)
def test_bad_bounds_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ResponseLru(**settings)  # type: ignore[arg-type]


def test_hit_returns_the_stored_response_and_counts() -> None:
    lru = ResponseLru(max_entries=10, max_bytes=100, ttl=10.0)
    response = _response(5)
    assert lru.put("a", response, now=0.0) == []
    assert lru.get("a", now=1.0) is response
    assert lru.get("b", now=1.0) is None
    assert lru.statistics() == LruStatistics(
        entries=1, bytes=5, hits=1, misses=1, evictions=0, expirations=0, rejected=0
    )


def test_eviction_by_entries_drops_the_least_recently_used() -> None:
    lru = ResponseLru(max_entries=3, max_bytes=1000, ttl=0)
    for key in "abc":
        lru.put(key, _response(1), now=0.0)
    assert lru.get("a", now=0.0) is not None  # a is now the most recent; b the least
    assert lru.put("d", _response(1), now=0.0) == ["b"]
    assert lru.keys() == ("c", "a", "d")
    assert lru.statistics().evictions == 1


def test_eviction_by_bytes_drops_as_many_as_needed() -> None:
    lru = ResponseLru(max_entries=100, max_bytes=100, ttl=0)
    for key in "abc":
        lru.put(key, _response(25), now=0.0)
    assert lru.put("d", _response(25), now=0.0) == []
    assert lru.put("e", _response(50), now=0.0) == ["a", "b"]
    assert lru.keys() == ("c", "d", "e")
    assert lru.put("f", _response(100), now=0.0) == ["c", "d", "e"]
    assert lru.statistics().bytes == 100


def test_an_entry_larger_than_max_bytes_is_refused_and_changes_nothing() -> None:
    lru = ResponseLru(max_entries=10, max_bytes=100, ttl=0)
    kept = _response(60)
    lru.put("a", kept, now=0.0)
    before = lru.statistics()
    assert lru.put("a", _response(101), now=0.0) == []
    assert lru.put("b", CachedResponse(200, HEADERS, (b"x" * 73,), 0.0), now=0.0) == []
    assert lru.get("a", now=0.0) is kept
    assert lru.statistics() == attrs.evolve(before, rejected=2, hits=1)


def test_replacing_an_entry_reaccounts_its_bytes_without_an_eviction() -> None:
    lru = ResponseLru(max_entries=2, max_bytes=100, ttl=0)
    lru.put("a", _response(10), now=0.0)
    lru.put("b", _response(10), now=0.0)
    assert lru.put("a", _response(40), now=0.0) == []
    assert lru.keys() == ("b", "a")
    stats = lru.statistics()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 50, 0)


@attrs.frozen
class Expiry:
    name: str
    ttl: float
    read_at: float
    hit: bool


@pytest.mark.parametrize(
    "case",
    [
        Expiry("fresh", ttl=10.0, read_at=9.999, hit=True),
        Expiry("exactly ttl old", ttl=10.0, read_at=10.0, hit=False),
        Expiry("stale", ttl=10.0, read_at=11.0, hit=False),
        Expiry("ttl 0 never expires", ttl=0.0, read_at=1e12, hit=True),
    ],
    ids=lambda case: case.name,
)
def test_ttl_expiry(case: Expiry) -> None:
    lru = ResponseLru(max_entries=10, max_bytes=100, ttl=case.ttl)
    lru.put("a", _response(7), now=100.0)
    assert (lru.get("a", now=100.0 + case.read_at) is not None) is case.hit
    stats = lru.statistics()
    expired = 0 if case.hit else 1
    assert (stats.hits, stats.misses, stats.expirations) == (1 - expired, expired, expired)
    assert (stats.entries, stats.bytes) == (1 - expired, 7 * (1 - expired))


def test_a_hit_does_not_extend_the_ttl() -> None:
    lru = ResponseLru(max_entries=10, max_bytes=100, ttl=10.0)
    lru.put("a", _response(1), now=0.0)
    assert lru.get("a", now=9.0) is not None
    assert lru.get("a", now=10.0) is None


def test_put_drops_expired_entries_before_evicting_live_ones() -> None:
    lru = ResponseLru(max_entries=2, max_bytes=100, ttl=10.0)
    lru.put("old", _response(1), now=0.0)
    lru.put("live", _response(1), now=5.0)
    assert lru.get("old", now=5.0) is not None  # most recent, but the first to expire
    assert lru.put("new", _response(1), now=11.0) == []
    assert lru.keys() == ("live", "new")
    assert lru.statistics().expirations == 1


def test_purge_expired_drops_only_the_stale() -> None:
    lru = ResponseLru(max_entries=10, max_bytes=100, ttl=10.0)
    for when, key in enumerate("abcd"):
        lru.put(key, _response(2), now=float(when))
    assert lru.purge_expired(now=11.5) == 2
    assert lru.keys() == ("c", "d")
    stats = lru.statistics()
    assert (stats.entries, stats.bytes, stats.expirations) == (2, 4, 2)


def test_delete_and_clear_keep_the_counters() -> None:
    lru = ResponseLru(max_entries=10, max_bytes=100, ttl=0)
    for key in "abc":
        lru.put(key, _response(3), now=0.0)
    lru.get("a", now=0.0)
    assert lru.delete("a") is True
    assert lru.delete("a") is False
    assert lru.statistics().bytes == 6
    assert lru.clear() == 2
    assert lru.statistics() == LruStatistics(
        entries=0, bytes=0, hits=1, misses=0, evictions=0, expirations=0, rejected=0
    )
    assert lru.put("a", _response(3), now=0.0) == []


# -- property tests against a naive model ------------------------------------------------------

KEYS = st.sampled_from("abcdef")
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), KEYS, st.integers(0, 60), st.floats(0, 4)),
        st.tuples(st.just("get"), KEYS, st.just(0), st.floats(0, 4)),
        st.tuples(st.just("delete"), KEYS, st.just(0), st.just(0.0)),
        st.tuples(st.just("purge"), KEYS, st.just(0), st.floats(0, 4)),
        st.tuples(st.just("clear"), KEYS, st.just(0), st.just(0.0)),
    ),
    max_size=60,
)


@attrs.define
class Model:
    """The LRU written the slow, obvious way: a list, most recent last."""

    max_entries: int
    max_bytes: int
    ttl: float
    held: list[tuple[str, CachedResponse, float]] = attrs.Factory(list)
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    rejected: int = 0

    def _index(self, key: str) -> int | None:
        return next((i for i, (k, _, _) in enumerate(self.held) if k == key), None)

    def get(self, key: str, now: float) -> CachedResponse | None:
        index = self._index(key)
        if index is not None and self.held[index][2] <= now:
            del self.held[index]
            self.expirations += 1
            index = None
        if index is None:
            self.misses += 1
            return None
        self.hits += 1
        entry = self.held.pop(index)
        self.held.append(entry)
        return entry[1]

    def put(self, key: str, response: CachedResponse, now: float) -> list[str]:
        if response.size > self.max_bytes:
            self.rejected += 1
            return []
        self.delete(key)
        self.purge(now)
        evicted = []
        while self.held and (
            len(self.held) >= self.max_entries
            or sum(r.size for _, r, _ in self.held) + response.size > self.max_bytes
        ):
            evicted.append(self.held.pop(0)[0])
        self.evictions += len(evicted)
        self.held.append((key, response, now + self.ttl if self.ttl else math.inf))
        return evicted

    def delete(self, key: str) -> bool:
        index = self._index(key)
        if index is not None:
            del self.held[index]
        return index is not None

    def purge(self, now: float) -> int:
        stale = [entry for entry in self.held if entry[2] <= now]
        self.held = [entry for entry in self.held if entry[2] > now]
        self.expirations += len(stale)
        return len(stale)


@given(
    st.integers(1, 4),
    st.integers(1, 100),
    st.sampled_from([0.0, 3.0, 10.0]),
    operations,
)
def test_lru_matches_the_model_and_bounds_always_hold(
    max_entries: int, max_bytes: int, ttl: float, ops: list[tuple[str, str, int, float]]
) -> None:
    lru = ResponseLru(max_entries=max_entries, max_bytes=max_bytes, ttl=ttl)
    model = Model(max_entries, max_bytes, ttl)
    now = 0.0
    for name, key, size, dt in ops:
        now += dt  # a monotonic clock, like trio.current_time()
        if name == "put":
            response = _response(size, stored_at=now)
            assert lru.put(key, response, now) == model.put(key, response, now)
        elif name == "get":
            assert lru.get(key, now) is model.get(key, now)
        elif name == "delete":
            assert lru.delete(key) is model.delete(key)
        elif name == "purge":
            assert lru.purge_expired(now) == model.purge(now)
        else:
            lru.clear()
            model.held.clear()

        stats = lru.statistics()
        assert stats.entries <= max_entries
        assert stats.bytes <= max_bytes
        assert stats.bytes == sum(response.size for _, response, _ in model.held)
        assert lru.keys() == tuple(k for k, _, _ in model.held)
        assert stats == LruStatistics(
            entries=len(model.held),
            bytes=stats.bytes,
            hits=model.hits,
            misses=model.misses,
            evictions=model.evictions,
            expirations=model.expirations,
            rejected=model.rejected,
        )


@given(st.lists(st.tuples(KEYS, st.booleans()), max_size=40))
def test_recency_order_is_the_order_of_last_use(uses: list[tuple[str, bool]]) -> None:
    lru = ResponseLru(max_entries=100, max_bytes=10_000, ttl=0)
    last_use: dict[str, int] = {}
    for step, (key, write) in enumerate(uses):
        if write:
            lru.put(key, _response(1), now=0.0)
            last_use[key] = step
        elif lru.get(key, now=0.0) is not None:
            last_use[key] = step
    assert lru.keys() == tuple(sorted(last_use, key=last_use.__getitem__))
