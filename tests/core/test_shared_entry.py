"""The level-2 value: a round trip gives back the response; anything else is a miss."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntonix.core.lru import CachedResponse
from ntonix.core.shared_entry import FORMAT, UnusableEntry, decode, encode
from ntonix.core.usage import Usage

KEY = "a" * 64
OTHER_KEY = "b" * 64

headers = st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=60)), max_size=5)
counts = st.integers(0, 2**40)
usages = st.none() | st.builds(Usage, prompt=counts, completion=counts, estimated=st.booleans())
responses = st.builds(
    CachedResponse,
    status=st.integers(100, 599),
    headers=headers.map(tuple),
    chunks=st.lists(st.binary(max_size=80), max_size=8).map(tuple),
    stored_at=st.just(0.0),
    usage=usages,
)


@given(responses, st.floats(0, 2e9))
def test_round_trip_gives_back_status_headers_chunks_in_order_and_usage(
    response: CachedResponse, stored_at: float
) -> None:
    entry = decode(KEY, encode(KEY, response, stored_at))
    assert (entry.status, entry.headers, entry.chunks, entry.usage) == (
        response.status,
        response.headers,
        response.chunks,
        response.usage,
    )
    assert entry.stored_at == stored_at


@given(responses, st.data())
def test_a_value_cut_short_anywhere_is_unusable(
    response: CachedResponse, data: st.DataObject
) -> None:
    value = encode(KEY, response, 1.0)
    cut = data.draw(st.integers(0, len(value) - 1))
    with pytest.raises(UnusableEntry):
        decode(KEY, value[:cut])


@given(responses, st.data())
def test_any_altered_byte_makes_the_value_unusable(
    response: CachedResponse, data: st.DataObject
) -> None:
    value = bytearray(encode(KEY, response, 1.0))
    index = data.draw(st.integers(0, len(value) - 1))
    value[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(UnusableEntry):
        decode(KEY, bytes(value))


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_foreign_bytes_are_unusable(value: bytes) -> None:
    with pytest.raises(UnusableEntry):
        decode(KEY, value)


@given(responses)
def test_a_value_copied_under_another_key_is_unusable(response: CachedResponse) -> None:
    with pytest.raises(UnusableEntry) as raised:
        decode(OTHER_KEY, encode(KEY, response, 1.0))
    assert raised.value.reason == "other-key"


def test_another_format_version_is_unusable() -> None:
    value = encode(KEY, CachedResponse(200, (), (b"x",), 0.0), 1.0)
    with pytest.raises(UnusableEntry) as raised:
        decode(KEY, FORMAT[:-1] + b"\x01" + value[len(FORMAT) :])
    assert raised.value.reason == "version"


def test_the_value_holds_no_request_text_but_the_key_hash() -> None:
    value = encode(KEY, CachedResponse(200, ((b"content-type", b"x/y"),), (b"hi",), 0.0), 1.0)
    assert KEY.encode() not in value
