"""Where the shared tier lives: `[shared] url` split into what a Valkey client needs.

Invariants: every accepted URL names exactly one server, by TCP host and port (`valkey://`,
`valkeys://` with TLS; `redis://` and `rediss://` are read the same way) or by a unix socket
path (`unix:///run/valkey.sock`); the database is a number (the URL's path, `?db=` for a unix
socket, default 0); credentials come out percent-decoded. A rejected URL raises ValueError with
a message that never repeats the URL, which may hold a password.
"""

from __future__ import annotations

import urllib.parse

import attrs

DEFAULT_PORT = 6379
_TCP_SCHEMES = {"valkey": False, "redis": False, "valkeys": True, "rediss": True}
URL_FORMS = "valkey://[user:password@]host[:port][/db], valkeys://... (TLS) or unix:///path"


@attrs.frozen
class ValkeyAddress:
    host: str = ""  # empty for a unix socket
    port: int = DEFAULT_PORT
    unix_path: str = ""
    tls: bool = False
    database: int = 0
    username: str = attrs.field(default="", repr=False)
    password: str = attrs.field(default="", repr=False)


def parse_valkey_url(url: str) -> ValkeyAddress:
    """The server that `url` names; ValueError (the URL not repeated) when it names none."""
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL (is the port a number in 1..65535?)") from None
    scheme = parts.scheme.lower()
    username = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    query = urllib.parse.parse_qs(parts.query)
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    if scheme == "unix":
        if parts.netloc.rpartition("@")[2] or not parts.path.startswith("/"):
            raise ValueError("a unix socket URL is unix:///absolute/path/of/the.sock")
        database = _database(query.get("db", ["0"])[-1])
        return ValkeyAddress(
            unix_path=parts.path, database=database, username=username, password=password
        )
    if scheme not in _TCP_SCHEMES:
        raise ValueError(f"must be one of {URL_FORMS}")
    if not parts.hostname:
        raise ValueError("has no host")
    if port == 0:
        raise ValueError("port must be a number in 1..65535")
    if set(query) - {"db"}:
        raise ValueError("takes no query parameters but db")
    path = parts.path.strip("/")
    database = _database(path or query.get("db", ["0"])[-1])
    return ValkeyAddress(
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        tls=_TCP_SCHEMES[scheme],
        database=database,
        username=username,
        password=password,
    )


def shown(address: ValkeyAddress) -> str:
    """The address as a URL fit for a log line: the user name kept, the password never."""
    user = f"{urllib.parse.quote(address.username)}@" if address.username else ""
    if address.unix_path:
        return f"unix://{user}{address.unix_path}?db={address.database}"
    scheme = "valkeys" if address.tls else "valkey"
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{scheme}://{user}{host}:{address.port}/{address.database}"


def _database(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError("the database (the URL's path, or ?db=) must be a number such as /0")
    return int(text)
