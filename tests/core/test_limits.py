from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.auth import ApiKeys, digest, keys_from_file
from ntonix.core.limits import ClientLimits
from ntonix.core.tenants import Tenant


def test_per_minute_allows_a_burst_then_refills_at_the_rate() -> None:
    limits = ClientLimits(per_minute=3, max_concurrent=0)
    verdicts = [limits.admit("k", now=0.0) for _ in range(4)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert verdicts[-1].retry_after == 20.0  # one token per 20 s at 3 per minute
    assert not limits.admit("k", now=19.0).allowed
    assert limits.admit("k", now=20.0).allowed


def test_one_client_cannot_use_another_clients_allowance() -> None:
    limits = ClientLimits(per_minute=1, max_concurrent=0)
    assert limits.admit("greedy", 0.0).allowed
    assert not limits.admit("greedy", 0.0).allowed
    assert limits.admit("polite", 0.0).allowed


def test_max_concurrent_counts_admitted_requests_until_released() -> None:
    limits = ClientLimits(per_minute=0, max_concurrent=2)
    assert limits.admit("k", 0.0).allowed
    assert limits.admit("k", 0.0).allowed
    refused = limits.admit("k", 0.0)
    assert not refused.allowed and refused.retry_after > 0
    limits.release("k")
    assert limits.admit("k", 0.0).allowed
    assert limits.in_flight("k") == 2


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=200))
def test_in_flight_never_exceeds_the_limit(operations: list[tuple[str, bool]]) -> None:
    limits = ClientLimits(per_minute=0, max_concurrent=3, max_clients=2)
    for key, admit in operations:
        if admit:
            limits.admit(key, 0.0)
        else:
            limits.release(key)
        assert all(limits.in_flight(k) <= 3 for k in "abc")
        assert limits.in_flight(key) >= 0


def test_idle_clients_are_forgotten_past_the_cap_but_busy_ones_kept() -> None:
    limits = ClientLimits(per_minute=0, max_concurrent=1, max_clients=2)
    assert limits.admit("busy", 0.0).allowed
    for key in ("x", "y", "z"):
        limits.admit(key, 0.0)
        limits.release(key)
    assert limits.in_flight("busy") == 1
    assert not limits.admit("busy", 0.0).allowed


def test_api_keys_identify_valid_bearer_tokens_by_digest_only() -> None:
    keys = ApiKeys(["sk-one", "sk-two"], requests_per_minute=5)
    assert keys.required
    one = keys.identify(b"Bearer sk-one")
    assert one is not None and one.identity == digest("sk-one") and one.name == "anonymous"
    assert one.requests_per_minute == 5
    two = keys.identify(b"bearer sk-two")
    assert two is not None and two.identity == digest("sk-two")
    for bad in (b"", b"Bearer", b"Bearer ", b"Basic sk-one", b"Bearer sk-three", b"sk-one"):
        assert keys.identify(bad) is None
    assert not ApiKeys([]).required


def test_keys_file_skips_blanks_and_comments() -> None:
    assert keys_from_file("# team keys\nsk-a\n\n  sk-b  \n# old: sk-c\n") == ["sk-a", "sk-b"]


def test_a_named_key_is_its_tenant_and_shows_its_name_not_the_key() -> None:
    team = Tenant("team-a", "key:team-a", tokens_per_minute=300, models=frozenset({"m1"}))
    keys = ApiKeys([], {digest("sk-team"): team})
    assert keys.required
    assert keys.identify(b"Bearer sk-team") is team
    assert keys.identify(b"Bearer sk-other") is None
    assert team.may_use("m1") and team.may_use(None) and not team.may_use("m2")
    assert team.rate_limited and not keys.anonymous("10.0.0.1").rate_limited
    assert "sk-team" not in repr(team)


def test_per_key_overrides_limit_each_key_by_its_own_numbers() -> None:
    limits = ClientLimits(per_minute=0, max_concurrent=0)
    assert limits.admit("small", 0.0, per_minute=1).allowed
    assert not limits.admit("small", 0.0, per_minute=1).allowed
    assert limits.admit("free", 0.0).allowed and limits.admit("free", 0.0).allowed
    assert limits.admit("one", 0.0, max_concurrent=1).allowed
    assert not limits.admit("one", 0.0, max_concurrent=1).allowed
    assert limits.remaining("small", 30.0, per_minute=1) == (0, 30.0)
    assert limits.remaining("small", 60.0, per_minute=1) == (1, 0.0)
