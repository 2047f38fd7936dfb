"""Per-client limits: requests per minute (a token bucket) and requests in flight.

Invariants: a client never has more than `max_concurrent` admitted requests that were not
released, and never more than `per_minute` admissions in any 60 s window beyond its bucket's
burst of `per_minute`; a refusal says how long to wait. Clients are keys (an API key's digest,
or a client address); one greedy key cannot use another's allowance. Memory stays bounded: the
least recently seen idle clients are forgotten past `max_clients`.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

MAX_CLIENTS = 100_000


@attrs.frozen
class Verdict:
    allowed: bool
    retry_after: float = 0.0  # seconds, when not allowed
    reason: str = ""


@attrs.define
class _Client:
    tokens: float
    refilled_at: float
    in_flight: int = 0


class ClientLimits:
    """`per_minute` and `max_concurrent` per client; 0 turns either off."""

    def __init__(
        self, *, per_minute: int, max_concurrent: int, max_clients: int = MAX_CLIENTS
    ) -> None:
        self.per_minute = per_minute
        self.max_concurrent = max_concurrent
        self._max_clients = max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    @property
    def active(self) -> bool:
        return bool(self.per_minute or self.max_concurrent)

    def admit(
        self,
        key: str,
        now: float,
        *,
        per_minute: int | None = None,
        max_concurrent: int | None = None,
    ) -> Verdict:
        """Take one request for `key`; an allowed one must be `release`d when it ends.

        `per_minute` and `max_concurrent` override the shared limits for this key (a named
        key's own); a key keeps the same limits from one call to the next."""
        per_minute = self.per_minute if per_minute is None else per_minute
        max_concurrent = self.max_concurrent if max_concurrent is None else max_concurrent
        client = self._client(key, now, per_minute)
        if max_concurrent and client.in_flight >= max_concurrent:
            # Nothing tells when one ends; a second is the usual polite wait.
            return Verdict(False, 1.0, f"more than {max_concurrent} requests in flight")
        if per_minute:
            rate = per_minute / 60.0
            client.tokens = min(
                float(per_minute), client.tokens + (now - client.refilled_at) * rate
            )
            client.refilled_at = now
            if client.tokens < 1.0:
                wait = (1.0 - client.tokens) / rate
                return Verdict(False, wait, f"more than {per_minute} requests per minute")
            client.tokens -= 1.0
        client.in_flight += 1
        return Verdict(True)

    def remaining(self, key: str, now: float, *, per_minute: int) -> tuple[int, float]:
        """Requests `key` may still make at once, and seconds until its bucket is full again."""
        client = self._clients.get(key)
        if client is None or not per_minute:
            return per_minute, 0.0
        rate = per_minute / 60.0
        tokens = min(float(per_minute), client.tokens + (now - client.refilled_at) * rate)
        return int(tokens), (per_minute - tokens) / rate

    def release(self, key: str) -> None:
        client = self._clients.get(key)
        if client is not None and client.in_flight:
            client.in_flight -= 1

    def in_flight(self, key: str) -> int:
        client = self._clients.get(key)
        return client.in_flight if client else 0

    def _client(self, key: str, now: float, per_minute: int) -> _Client:
        client = self._clients.get(key)
        if client is None:
            self._forget_idle()
            client = _Client(tokens=float(per_minute), refilled_at=now)
            self._clients[key] = client
        self._clients.move_to_end(key)
        return client

    def _forget_idle(self) -> None:
        # Room for one more, oldest first; a client with requests in flight is kept so its
        # releases still count (so the cap can be exceeded while that many are busy).
        excess = len(self._clients) + 1 - self._max_clients
        for key in list(self._clients):
            if excess <= 0:
                break
            if not self._clients[key].in_flight:
                del self._clients[key]
                excess -= 1
