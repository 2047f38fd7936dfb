"""The names of everything the gateway keeps in the shared tier, in one place.

Invariant: every name starts with `ntonix:` and holds hashes or ids, never request text or API
keys: a cache key is a SHA-256 of the request and its tenant scope, a client is a SHA-256 of
its key or address, a flight id is a random worker token and a counter.
"""

from __future__ import annotations


def entry_name(key: str) -> str:
    """The level-2 cache entry of cache key `key`."""
    return f"ntonix:cache:{key}"


def lease_name(key: str) -> str:
    """The lease of the flight for `key`: whoever holds it leads, on every worker."""
    return f"ntonix:flight:{key}"


def stream_name(flight_id: str) -> str:
    """Where a leading flight is published for its followers."""
    return f"ntonix:stream:{flight_id}"


def watch_name(flight_id: str) -> str:
    """Set by the first follower of a flight: only watched flights are published."""
    return f"ntonix:watch:{flight_id}"


def limit_names(client: str) -> tuple[str, str]:
    """A client's admissions of the last minute and its concurrency leases; `client` is a hash.
    One hash tag: on a cluster both live on the same node, as one script uses both."""
    return f"ntonix:limits:{{{client}}}:rate", f"ntonix:limits:{{{client}}}:slots"


def token_names(client: str, day: int) -> tuple[str, str]:
    """A client's tokens of the last minute (per second) and of UTC day `day`; `client` is a
    hash. One hash tag, as for `limit_names`."""
    return f"ntonix:tokens:{{{client}}}:minute", f"ntonix:tokens:{{{client}}}:day:{day}"
