"""A backend's URL split once into what the upstream client needs, or a human's error.

Invariants this module owns:
- `split_backend_url` accepts only absolute http:// or https:// URLs with a host (a name or a
  bracketed IPv6 address), an optional port in 1..65535 and an optional path; anything else
  raises ValueError whose message says what is wrong, for a config problem line.
- Messages never echo a URL that holds user:password@ (credentials go in `api_key`).
- A split URL is lower-case host, IPv6 without brackets, the scheme's default port when the
  URL has none, and a base path without a trailing slash ("" for none).
"""

import ipaddress
import json
import re
from urllib.parse import urlsplit

import attrs

DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[a-z0-9_][a-z0-9_.-]*")


@attrs.frozen
class SplitUrl:
    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def _bracketed_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def host_header(self) -> bytes:
        default = self.port == DEFAULT_PORTS[self.scheme]
        return (self._bracketed_host + ("" if default else f":{self.port}")).encode("ascii")

    @property
    def default_name(self) -> str:
        return f"{self._bracketed_host}:{self.port}"


def split_backend_url(url: str) -> SplitUrl:
    """Split a backend URL, or raise ValueError saying, for a human, what is wrong with it."""
    got = "" if "@" in url else f" (got {_quoted(url)})"  # user:password@ must not be echoed
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(f"must not contain spaces or control characters{got}")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"is not a valid URL{got}") from None
    if parts.scheme not in DEFAULT_PORTS or not url.lower().startswith(parts.scheme + "://"):
        raise ValueError(f"must start with http:// or https://{got}")
    if "@" in parts.netloc:
        raise ValueError("must not contain user:password@ (use api_key for credentials)")
    if "?" in url or "#" in url:
        raise ValueError(f"must not have a query string or fragment (? or #){got}")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"has no host{got}")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"has an invalid IPv6 address{got}") from None
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"has an invalid host name {json.dumps(host)}{got}")
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        port = 0
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535{got}")
    scheme = parts.scheme
    return SplitUrl(scheme, host, port or DEFAULT_PORTS[scheme], parts.path.rstrip("/"))


def _quoted(url: str) -> str:
    """The URL as a TOML string, shortened as the config's other messages shorten values."""
    text = json.dumps(url, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
