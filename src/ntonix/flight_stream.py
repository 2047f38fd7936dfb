"""What a led flight publishes on its stream, and how a following flight applies it.

A stream (`ntonix:stream:<id>`) holds numbered entries; each has some of these fields: `n` its
number (from 1, no gaps), `h` the head, `c` the pieces since the last entry (with the usage a
whole cache entry carries), `u` the usage known at the end, `x` the leader's error before its
head (JSON), and `e` how the flight ended (END_OK, END_FAILED or END_ABANDONED).

Invariants this module owns:
- Heads, pieces and usage are encoded as cache entries (`core/shared_entry.py`): one format,
  one decoder, and a value that does not decode is the follower's 502, never a crash.
- An entry is applied whole and in order: the head before any piece, the end last.
- A follower takes entries by their number only: a gap (its stream trimmed or replaced) loses
  it, never skips ahead.
- A cache entry found instead of a stream is the same as a stream that ended with END_OK.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from ntonix.core.lru import CachedResponse
from ntonix.core.shared_entry import UnusableEntry, decode, encode
from ntonix.errors import GatewayError

if TYPE_CHECKING:
    from ntonix.cache import Flight

# How a published flight ended: answered, failed (its error frame or error came before), or
# abandoned (its last local listener left): its followers go on without it.
END_OK, END_FAILED, END_ABANDONED = b"ok", b"failed", b"abandoned"


class LeaderLost(Exception):
    """The flight followed stopped: its leader died, or the tier is gone."""


@attrs.define
class Leading:
    """A flight this worker leads, and how much of it its stream has had."""

    flight: Flight
    key: str
    flight_id: str
    sequence: int = 0  # entries published
    head_sent: bool = False
    pieces_sent: int = 0
    renewed_at: float = 0.0
    watched: bool = False  # someone follows: publish (all of it so far, then the rest)


@attrs.define
class Following:
    """A flight this worker follows: where its stream was read to, and what waits to apply."""

    key: str
    flight_id: str
    last_id: str = "0-0"
    sequence: int = 0  # the next entry expected
    heard_at: float = 0.0  # last entry
    checked_at: float = 0.0  # lease and entry last looked at
    entries: collections.deque[dict[bytes, bytes]] = attrs.Factory(collections.deque)
    lost: bool = False
    changed: trio.Event = attrs.Factory(trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def take(self, entries: Mapping[bytes, list[list[bytes]]], now: float) -> None:
        """Queue a stream's new entries for its following flight, in order, gaps refused."""
        for entry_id, pairs in entries.items():
            fields = {pair[0]: pair[1] for pair in pairs}
            self.last_id = text_of(entry_id)
            self.heard_at = now
            if int(fields.get(b"n", b"0")) != self.sequence + 1:
                self.lose()  # a gap: the stream was trimmed or replaced
                break
            self.sequence += 1
            self.entries.append(fields)
        self.notify()

    def lose(self) -> None:
        self.lost = True
        self.notify()


def news(leading: Leading, end: bytes | None) -> list[tuple[bytes, bytes]]:
    """What the flight produced since the last entry, as stream fields."""
    flight = leading.flight
    key = leading.key
    fields: list[tuple[bytes, bytes]] = []
    if flight.committed and not leading.head_sent:
        head = CachedResponse(flight.status, tuple(flight.headers), (), 0.0)
        fields.append((b"h", encode(key, head, 0.0)))
        leading.head_sent = True
    if flight.open_to_joiners:  # else too large to share: its pieces were let go
        pieces = flight.pieces[leading.pieces_sent :]
        if pieces:
            leading.pieces_sent += len(pieces)
            chunks = CachedResponse(0, (), tuple(pieces), 0.0)
            fields.append((b"c", encode(key, chunks, 0.0)))
    if flight.error is not None:
        fields.append((b"x", error_json(flight.error)))
    if end is not None:
        if flight.usage is not None:  # known before the end: followers count it as cached
            fields.append((b"u", encode(key, CachedResponse(0, (), (), 0.0, flight.usage), 0.0)))
        fields.append((b"e", end))
    return fields


async def apply_entry(flight: Flight, key: str, entry: dict[bytes, bytes]) -> bool:
    """One published entry into the local flight; True once the flight has ended."""
    try:
        if b"h" in entry:
            head = decode(key, entry[b"h"])
            await flight.start(head.status, list(head.headers))
        if b"c" in entry:
            chunks = decode(key, entry[b"c"])
            for piece in chunks.chunks:
                await flight.write(piece, more=True)
            flight.usage = chunks.usage or flight.usage  # a whole entry carries its usage
        if b"u" in entry:
            flight.usage = decode(key, entry[b"u"]).usage
    except UnusableEntry:
        raise GatewayError(
            502, "backend_failed", "The shared upstream request was garbled", source="gateway"
        ) from None
    if b"x" in entry:  # failed before its head: the leader's error, as JSON
        error = json.loads(entry[b"x"])
        raise GatewayError(error["status"], error["code"], error["message"], source="gateway")
    end = entry.get(b"e")
    if end is None:
        return False
    if end == END_ABANDONED:
        raise LeaderLost
    if end != END_OK:
        flight.failed = True  # its error frame, if any, came as its last piece
        if not flight.pieces or not flight.committed:
            raise GatewayError(
                502, "backend_failed", "The shared upstream request failed", source="gateway"
            )
    await flight.write(b"", more=False)
    return True


def entry_of_cached(key: str, value: object) -> dict[bytes, bytes] | None:
    """A cache entry as one stream entry (the head, every chunk and a normal end); None for
    a value that is not a usable entry."""
    if not isinstance(value, bytes):
        return None
    try:
        stored = decode(key, value)
    except UnusableEntry:
        return None
    head = CachedResponse(stored.status, stored.headers, (), 0.0)
    chunks = CachedResponse(0, (), stored.chunks, 0.0, stored.usage)
    return {b"h": encode(key, head, 0.0), b"c": encode(key, chunks, 0.0), b"e": END_OK}


def end_of(flight: Flight) -> bytes | None:
    """How a flight ended, for its followers; None while it runs and can be followed."""
    if not flight.open_to_joiners:
        return END_ABANDONED  # too large to share: followers that sent nothing take over
    if not flight.finished:
        return None
    if flight.aborted and not flight.failed:
        return END_ABANDONED
    return END_FAILED if flight.failed or flight.error else END_OK


def error_json(error: GatewayError) -> bytes:
    return json.dumps(
        {"status": error.status, "code": error.code, "message": error.message}
    ).encode()


def text_of(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
