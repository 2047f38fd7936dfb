"""The response cache's Trio side: lookups, shared flights (coalescing) and the writer task.

Reads are direct LRU lookups on the event loop. A cacheable miss becomes a `Flight`: the
upstream exchange runs in the supervisor nursery, not in the request that started it, and every
identical request that arrives meanwhile subscribes to it: it gets the pieces produced so far,
then the rest live. The flight lives while anyone listens (the first client leaving does not cut
the others) and is cancelled, closing its upstream, when the last one leaves. A flight that
ended normally with a complete 200 is offered, as the chunks it was made of, to the writer task
through a memory channel; a full channel drops the offer and counts it.

With a shared tier, the LRU is level 1 and Valkey level 2 (shared_cache.py): a miss in L1
asks L2 (within the tier's budget) before it starts a flight; an L2 hit is replayed as an L1
hit is, and offered to the writer for L1. The writer stores each flight in L1, then in L2:
the tier is written off the request path.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from ntonix.config import CacheSettings
from ntonix.core.framing import StreamKind, stream_error_frame, stream_kind
from ntonix.core.lru import CachedResponse, LruStatistics, ResponseLru
from ntonix.core.recording import StreamRecorder
from ntonix.core.usage import Usage
from ntonix.downstream import Downstream
from ntonix.errors import Dialect, GatewayError
from ntonix.shared_cache import SharedCache
from ntonix.shared_flights import Follow, Lead

log = logging.getLogger("ntonix.cache")

# Offers waiting for the writer; past this the writer is behind and offers are dropped.
WRITE_QUEUE = 1024
# Most entries the writer sends to L2 in one pipeline.
WRITE_BATCH = 64
# How far the slowest listener may fall behind before the flight stops reading upstream:
# back-pressure reaches the backend instead of the gateway buffering without bound.
MAX_LAG_BYTES = 1024 * 1024
# A flight keeps what it produced for listeners that join late, up to this much; larger answers
# take no new listeners, free what every listener has taken, and are not cached.
MAX_SHARED_BYTES = 8 * 1024 * 1024
# Response headers that belong to one client's exchange, not to the cached answer.
_PER_REQUEST = frozenset({b"x-request-id", b"x-ntonix-backend", b"x-ntonix-cache"})


class Flight:
    """One upstream exchange shared by identical requests; the proxy writes into it as into a
    client, and each listener replays it to its own client."""

    def __init__(self, key: str, request_id: bytes, *, store: bool, dialect: Dialect) -> None:
        self.key = key
        self.request_id = request_id
        self.store = store
        self.dialect = dialect  # one route, one dialect: the cache key holds the target
        self.scope = trio.CancelScope()
        self.committed = False
        self.kind = StreamKind.OTHER
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.pieces: list[bytes] = []
        self.error: GatewayError | None = None  # failed before commit
        self.failed = False  # ended with an error frame or an abort
        self.usage: Usage | None = None  # what the answer took, once it is known
        self.finished = False
        self.aborted = False  # ended with no frame to tell: listeners abort their clients
        self.listeners = 0
        self.open_to_joiners = True
        self.follower = False  # fed from another worker's flight, which stores the answer
        self._listener_ids = itertools.count()
        self._positions: dict[int, int] = {}  # listener -> pieces taken
        self._ends: list[int] = []  # bytes produced up to and including each piece
        self._size = 0
        self._recorder: StreamRecorder | None = None
        self._changed = trio.Event()
        self._caught_up = trio.Event()

    # The response-sink side, driven by Proxy.forward inside the flight task.

    async def start(
        self, status: int, headers: list[tuple[bytes, bytes]], *, body_follows: bool = False
    ) -> None:
        # `body_follows` is for a client's connection; `listen` writes each client's own.
        self.kind = stream_kind(headers)
        self.status = status
        self.headers = headers
        self.committed = True
        self._recorder = StreamRecorder(self.kind, MAX_SHARED_BYTES)
        self._notify()

    async def write(self, data: bytes, *, more: bool) -> None:
        if data:
            self.pieces.append(data)
            self._size += len(data)
            self._ends.append(self._size)
            assert self._recorder is not None
            self._recorder.feed(data)
            if self._size > MAX_SHARED_BYTES:
                self._release_taken()
        if not more:
            self.finished = True
        self._notify()
        while self._lag() > MAX_LAG_BYTES:
            self._caught_up = trio.Event()
            await self._caught_up.wait()

    async def fail(self, error: GatewayError) -> None:
        self.failed = True
        if not self.committed:
            self.error = error
            self.finished = True
            self._notify()
            return
        tail = self.pieces[-1][-4:] if self.pieces else b""
        frame = stream_error_frame(self.kind, tail, error.payload(self.dialect))
        if frame is None:
            self.aborted = True
            self.finished = True
            self._notify()
        else:
            await self.write(frame, more=False)

    # The listener side.

    def join(self) -> int:
        listener = next(self._listener_ids)
        self.listeners += 1
        self._positions[listener] = 0
        return listener

    def leave(self, listener: int) -> None:
        """A listener is done; the last one to leave while the flight runs cancels it."""
        self._positions.pop(listener, None)
        self.listeners -= 1
        self._caught_up.set()
        if self.listeners == 0 and not self.finished:
            self.scope.cancel()

    def taken(self, listener: int, count: int) -> None:
        self._positions[listener] = count
        self._caught_up.set()

    async def wait_changed(self) -> None:
        """Until the flight commits, produces a piece or finishes."""
        await self._changed.wait()

    def cached(self, now: float) -> CachedResponse | None:
        """The response to store, if it is a complete 200 that ended normally."""
        recorder = self._recorder
        if not self.store or self.failed or self.status != 200 or recorder is None:
            return None
        if self.kind is StreamKind.OTHER:
            recorder.finish()
        if not recorder.complete():
            return None
        headers = tuple((n, v) for n, v in self.headers if n not in _PER_REQUEST)
        return CachedResponse(self.status, headers, recorder.chunks(), now, self.usage)

    def end(self) -> None:
        """The flight task is over, whatever way it ended."""
        if not self.finished:
            self.aborted = True
            self.finished = True
        self._notify()

    def _release_taken(self) -> None:
        self.open_to_joiners = False
        slowest = min(self._positions.values(), default=len(self.pieces))
        for index in range(slowest):
            self.pieces[index] = b""

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _lag(self) -> int:
        if not self._positions:
            return 0
        slowest = min(self._positions.values())
        return self._size - (self._ends[slowest - 1] if slowest else 0)


@attrs.frozen
class CacheStatistics:
    entries: int
    bytes: int
    hits: int
    misses: int
    coalesced: int
    bypass: int
    evictions: int
    expirations: int
    stored: int
    dropped_offers: int
    flights: int
    max_entries: int
    max_bytes: int
    l2_hits: int = 0  # hits answered from the shared tier (counted in `hits` too)
    l2_misses: int = 0
    l2_rejected: int = 0  # values in the tier that did not decode: a miss
    l2_stored: int = 0
    flights_led: int = 0  # flights published for other workers and instances
    flights_followed: int = 0  # flights fed from another worker's or instance's
    takeovers: int = 0  # followers that went upstream themselves: their leader was gone
    followers_lost: int = 0  # followers ended with an error frame: their leader was gone


class ResponseCache:
    """Lookups, flights and the writer task's channel, for one gateway process."""

    def __init__(
        self, settings: CacheSettings, nursery: trio.Nursery, shared: SharedCache | None = None
    ) -> None:
        self.settings = settings
        self.shared = shared
        self._nursery = nursery
        self._lru = ResponseLru(
            max_entries=settings.max_entries, max_bytes=settings.max_bytes, ttl=settings.ttl
        )
        self._flights: dict[str, Flight] = {}
        self._looking: dict[str, trio.Event] = {}  # keys being looked up in L2
        # (key, the flight that made it or None for an L2 hit, the response)
        self._offers, self._to_write = trio.open_memory_channel[
            tuple[str, Flight | None, CachedResponse]
        ](WRITE_QUEUE)
        self.hits = self.misses = self.coalesced = self.bypass = 0
        self.stored = self.dropped_offers = 0

    def lookup(self, key: str) -> CachedResponse | None:
        response = self._lru.get(key, trio.current_time())
        if response is not None:
            self.hits += 1
        return response

    async def lookup_shared(self, key: str) -> CachedResponse | Lead | Follow | None:
        """A miss in L1 asks L2; a hit there is offered to the writer for L1 too. On a miss,
        whether this worker leads the key's flight or follows another worker's."""
        if self.shared is None:
            return None
        # One lookup per key at a time: the first one's answer (a lease, say) is acted on
        # before the others look, so they join its flight rather than follow its lease.
        while (pending := self._looking.get(key)) is not None:
            await pending.wait()
            if key in self._flights:
                return None  # joinable, unless it cannot take joiners: then one of our own
        looked = self._looking[key] = trio.Event()
        try:
            response = await self.shared.fetch(key)
        finally:
            del self._looking[key]
            looked.set()
        if not isinstance(response, CachedResponse):
            return response
        self.hits += 1
        # A full channel drops it: the next request asks L2 again.
        with contextlib.suppress(trio.WouldBlock):
            self._offers.send_nowait((key, None, response))
        return response

    def joinable(self, key: str) -> Flight | None:
        flight = self._flights.get(key)
        if flight is None or not flight.open_to_joiners or flight.aborted or flight.error:
            return None
        self.coalesced += 1
        return flight

    def start_flight(
        self,
        key: str,
        request_id: bytes,
        *,
        coalesce: bool,
        store: bool,
        dialect: Dialect,
        run: Callable[[Flight], Awaitable[None]],
        remote: Lead | Follow | None = None,
    ) -> Flight:
        """A new upstream exchange in the supervisor nursery; `run` drives it (Proxy.forward).
        With `remote`, it leads the key's flight for other workers, or follows another's (a
        follower is counted as coalesced: no backend request of its own)."""
        if isinstance(remote, Follow):
            self.coalesced += 1
        else:
            self.misses += 1
        flight = Flight(key, request_id, store=store, dialect=dialect)
        if coalesce:
            self._flights[key] = flight
        if self.shared is not None and isinstance(remote, Lead):
            self.shared.flights.lead(flight, key, remote.flight_id)
        elif self.shared is not None and isinstance(remote, Follow):
            flight.follower = True
            run = self.shared.flights.follower(key, remote.flight_id, run)
        self._nursery.start_soon(self._fly, flight, run)
        return flight

    async def _fly(self, flight: Flight, run: Callable[[Flight], Awaitable[None]]) -> None:
        try:
            with flight.scope:
                try:
                    await run(flight)
                except GatewayError as error:
                    await flight.fail(error)
        except Exception:
            log.exception("a shared upstream exchange failed")
            flight.failed = True
        except BaseException:
            self._land(flight)
            raise
        flight.end()
        response = flight.cached(trio.current_time())
        if response is None:
            self._land(flight)
            return
        try:
            # The flight stays joinable (a finished one replays whole) until the writer has
            # put its answer in the LRU: an identical request never finds neither.
            self._offers.send_nowait((flight.key, flight, response))
        except trio.WouldBlock:
            self.dropped_offers += 1
            self._land(flight)

    def _land(self, flight: Flight) -> None:
        flight.end()
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    async def write_forever(self) -> None:
        """The cache writer: the only task that adds entries to the LRU, and to L2 (the
        offers waiting, in one pipeline)."""
        async for offer in self._to_write:
            offers = [offer]
            with contextlib.suppress(trio.WouldBlock):
                while len(offers) < WRITE_BATCH:
                    offers.append(self._to_write.receive_nowait())
            now = trio.current_time()
            for key, flight, response in offers:
                self._lru.put(key, response, now)
                if flight is not None:  # else it came from L2, which has it
                    self.stored += 1
                    self._land(flight)
            stored = [
                (key, response)
                for key, flight, response in offers
                if flight is not None and not flight.follower
            ]
            if self.shared is not None and stored:
                self.shared.store(stored)

    def clear(self) -> int:
        return self._lru.clear()

    def statistics(self) -> CacheStatistics:
        lru: LruStatistics = self._lru.statistics()
        shared = self.shared
        return CacheStatistics(
            entries=lru.entries,
            bytes=lru.bytes,
            hits=self.hits,
            misses=self.misses,
            coalesced=self.coalesced,
            bypass=self.bypass,
            evictions=lru.evictions,
            expirations=lru.expirations,
            stored=self.stored,
            dropped_offers=self.dropped_offers,
            flights=len(self._flights),
            max_entries=self.settings.max_entries,
            max_bytes=self.settings.max_bytes,
            l2_hits=shared.hits if shared else 0,
            l2_misses=shared.misses if shared else 0,
            l2_rejected=shared.rejected if shared else 0,
            l2_stored=shared.stored if shared else 0,
            flights_led=shared.flights.led if shared else 0,
            flights_followed=shared.flights.followed if shared else 0,
            takeovers=shared.flights.taken_over if shared else 0,
            followers_lost=shared.flights.lost if shared else 0,
        )


async def listen(flight: Flight, downstream: Downstream) -> None:
    """Replay a flight to one client: what it produced so far at once, then the rest live."""
    listener = flight.join()
    try:
        while not flight.committed and not flight.finished:
            await flight.wait_changed()
        if not flight.committed:
            await downstream.fail(flight.error or _LOST)
            return
        # Bytes already there are written at once: the head may go out with them.
        follows = bool(flight.pieces) or flight.finished
        await downstream.start(flight.status, list(flight.headers), body_follows=follows)
        taken = 0
        while True:
            pieces = flight.pieces
            while taken < len(pieces):
                piece = pieces[taken]
                taken += 1
                await downstream.write(piece, more=True)
                flight.taken(listener, taken)
            if flight.finished:
                if not flight.aborted:
                    await downstream.write(b"", more=False)
                return  # else leave the body unfinished: the client sees the failure
            await flight.wait_changed()
    finally:
        flight.leave(listener)


async def replay(response: CachedResponse, downstream: Downstream) -> None:
    """A hit: the same status, headers and chunks, in the same order, as a stream."""
    await downstream.start(response.status, list(response.headers), body_follows=True)
    last = len(response.chunks) - 1
    for index, chunk in enumerate(response.chunks):
        await downstream.write(chunk, more=index < last)
    if last < 0:
        await downstream.write(b"", more=False)


_LOST = GatewayError(502, "backend_failed", "The shared upstream request failed", source="gateway")
