"""What the gateway counts about WebSocket sessions: plain numbers, updated per message.

Invariants: `active` is exactly the sessions accepted and not yet ended; every session that
reached the gateway ends in exactly one `finish` (refused ones too, with their status); messages
and bytes are counted once, in the direction they travelled ("to_backend" or "to_client").
"""

from __future__ import annotations

from collections import Counter

import attrs

from ntonix.core.telemetry import Histogram

# Seconds: a refused handshake (milliseconds) to a long conversation (hours).
SESSION_BUCKETS = (0.01, 0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0)
DIRECTIONS = ("to_backend", "to_client")


class SessionCounts:
    """One session's traffic and how it ended, for its access-log line and the tallies."""

    __slots__ = ("backend_code", "client_code", "closed_by", "messages_in", "messages_out")

    def __init__(self) -> None:
        self.messages_in = 0  # client -> backend
        self.messages_out = 0  # backend -> client
        self.closed_by = ""  # "client" | "backend" | "gateway"; "" for a refused session
        self.client_code: int | None = None  # the close code the client sent or was sent
        self.backend_code: int | None = None  # the close code the backend sent or was sent

    def as_log(self) -> dict[str, object]:
        return {
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "closed_by": self.closed_by or None,
            "client_close": self.client_code,
            "backend_close": self.backend_code,
        }


@attrs.define
class SessionTallies:
    """Every WebSocket counter of /metrics."""

    active: int = 0
    sessions: Counter[tuple[str, str]] = attrs.field(factory=Counter)  # (backend, status)
    closes: Counter[str] = attrs.field(factory=Counter)  # by closed_by
    messages: Counter[str] = attrs.field(factory=Counter)  # by direction
    bytes: Counter[str] = attrs.field(factory=Counter)  # by direction
    durations: Histogram = attrs.field(factory=lambda: Histogram(SESSION_BUCKETS))

    def finish(
        self,
        *,
        backend: str,
        status: int,
        counts: SessionCounts,
        bytes_in: int,
        bytes_out: int,
        duration: float,
    ) -> None:
        """Count a session that ended (or was refused, with its status)."""
        self.sessions[(backend, str(status))] += 1
        if counts.closed_by:
            self.closes[counts.closed_by] += 1
        self.messages["to_backend"] += counts.messages_in
        self.messages["to_client"] += counts.messages_out
        self.bytes["to_backend"] += bytes_in
        self.bytes["to_client"] += bytes_out
        self.durations.observe(duration)
