"""`[shared] url`: the server it names, or an error that never repeats the URL."""

import pytest

from ntonix.core.valkey_url import ValkeyAddress, parse_valkey_url, shown


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("valkey://cache:6380/2", ValkeyAddress(host="cache", port=6380, database=2)),
        ("valkey://cache", ValkeyAddress(host="cache")),
        ("redis://10.0.0.5/", ValkeyAddress(host="10.0.0.5")),
        (
            "valkeys://u:p%40ss@cache/1",
            ValkeyAddress(host="cache", tls=True, database=1, username="u", password="p@ss"),
        ),
        ("valkey://:pw@[::1]:7000", ValkeyAddress(host="::1", port=7000, password="pw")),
        ("unix:///run/v.sock", ValkeyAddress(unix_path="/run/v.sock")),
        ("unix:///run/v.sock?db=3", ValkeyAddress(unix_path="/run/v.sock", database=3)),
    ],
)
def test_urls_name_one_server(url: str, address: ValkeyAddress) -> None:
    assert parse_valkey_url(url) == address


@pytest.mark.parametrize(
    "url",
    [
        "http://cache:6379",
        "valkey://",
        "valkey://u:secret@cache:99999",
        "valkey://u:secret@cache:0",
        "valkey://u:secret@cache/x",
        "valkey://u:secret@cache?ssl=1",
        "unix://host/run.sock",
        "valkey://ca che",
        "valkey://u:secret@cache#frag",
    ],
)
def test_bad_urls_are_refused_without_repeating_them(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_valkey_url(url)
    assert "secret" not in str(raised.value)
    assert url not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "shown_as"),
    [
        ("valkey://user:pa%3Ass@cache.internal/3", "valkey://user@cache.internal:6379/3"),
        ("valkeys://:secret@[::1]:6380", "valkeys://[::1]:6380/0"),
        ("unix://:secret@/run/valkey.sock?db=2", "unix:///run/valkey.sock?db=2"),
    ],
)
def test_an_address_is_shown_without_its_password(url: str, shown_as: str) -> None:
    assert shown(parse_valkey_url(url)) == shown_as
