"""Level 2 of the response cache: entries in Valkey, shared by every worker and instance.

One entry is one value (core/shared_entry.py) written by one SET with the cache's TTL, so a
reader sees a whole entry or none. Key names hold the cache key (a SHA-256 of the request and
its tenant scope), never request text. A value that does not decode (cut short, altered,
foreign) is a miss, counted as `rejected`. Every call is a tier call: within the budget, and a
failed or skipped one is a miss too; the request goes on with L1 alone.

A call to Valkey costs the gateway about as much CPU as a tenth of a request, so calls are
shared: a worker has at most one lookup call out at a time, and the lookups that arrive while
it is out (or within the scheduling round that began a batch; with none out, until the event
loop runs out of work, at most `[shared] lookup_hold`) go out together
as the next script call (per key: the entry, or else the key's flight lease,
shared_flights.py), and the entries waiting to be stored ride along in that same call (their
SETs run first, so a lookup in it sees them), as do the looks for followers of the flights the
worker leads. An entry no lookup carried within STORE_WAIT goes out with the others then
waiting, in one pipeline. So a busy worker stores for free and an idle one stores late by at
most STORE_WAIT (its flight's lease covers that gap: a request for the key on another worker
follows it and finds the entry).

`clear` (DELETE /ntonix/cache) unlinks every entry and flight lease, a page of SCAN at a time,
each call under a budget twice a request's and the whole sweep under CLEAR_BUDGET: it is an
admin action, rare, and a large L2 takes many pages.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio
from trio.testing import wait_all_tasks_blocked

from ntonix.core.lru import CachedResponse
from ntonix.core.shared_entry import UnusableEntry, decode, encode
from ntonix.shared_flights import LOOKUP, Follow, Lead, SharedFlights
from ntonix.shared_keys import entry_name, lease_name
from ntonix.tier import SharedTier, TierUnavailable

if TYPE_CHECKING:
    import glide

log = logging.getLogger("ntonix.shared")

STORE_WAIT = 0.05  # seconds an entry waits for a lookup to carry it
CLEAR_BUDGET = 30.0  # seconds for the whole sweep of `clear`
CLEAR_PAGE = 1000  # keys asked of each SCAN


class _Lookups:
    """Keys asked for in one scheduling round, answered by one script call."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}  # key -> the flight id it would lead under
        self.answers: dict[str, list[object]] = {}
        self.failed = False
        self.done = trio.Event()


class SharedCache:
    """Reads and writes of cached responses in the tier, with their counters."""

    def __init__(self, tier: SharedTier, ttl: float, flights: SharedFlights) -> None:
        self.tier = tier
        self.ttl = ttl
        self.flights = flights
        self.hits = self.misses = self.rejected = self.stored = 0
        self._gathering: _Lookups | None = None  # the batch lookups join
        self._sending: trio.Event | None = None  # set when the batch out now has its answer
        self._waiting: list[tuple[str, CachedResponse]] = []  # entries not sent yet
        self._waiting_since = 0.0  # when the oldest of them came
        self._entries_added = trio.Event()
        from glide import Script  # optional: only a gateway with a tier gets here

        self._script = Script(LOOKUP)  # type: ignore[no-untyped-call]

    async def fetch(self, key: str) -> CachedResponse | Lead | Follow | None:
        """The entry for `key` (with `stored_at` on this process's clock); on a miss, whether
        this worker leads the key's flight or follows another's; None when the tier cannot
        tell (a miss, and a flight of this worker alone)."""
        try:
            answer, lead_id = await self._lookup(key)
        except TierUnavailable:
            self.misses += 1
            return None
        if answer[0] != 1:
            self.misses += 1
            return Lead(lead_id) if answer[0] == 2 else Follow(_text(answer[1]))
        value = answer[1]
        assert isinstance(value, bytes)
        try:
            entry = decode(key, value)
        except UnusableEntry as unusable:
            self.rejected += 1
            log.warning("shared cache: an unusable entry (%s) is a miss", unusable.reason)
            return None
        age = max(0.0, time.time() - entry.stored_at)
        if self.ttl and age >= self.ttl:
            self.misses += 1
            return None
        self.hits += 1
        stored_at = trio.current_time() - age  # so the L1 copy expires when this one does
        return CachedResponse(entry.status, entry.headers, entry.chunks, stored_at, entry.usage)

    def store(self, entries: Sequence[tuple[str, CachedResponse]]) -> None:
        """Queue entries for the next lookup call, or for `store_forever` after STORE_WAIT."""
        if not self._waiting:
            self._waiting_since = trio.current_time()
        self._waiting.extend(entries)
        self._entries_added.set()

    async def store_forever(self) -> None:
        """Send what no lookup carried, STORE_WAIT after it came: one pipeline of SETs (with
        the others then waiting), each expiring with the cache's TTL; a failed write is only
        not counted. Only an entry that waited that long starts one: on a busy worker the
        lookups carry every entry within a few milliseconds, and a pipeline sent on a timer
        alone would be a call of its own every STORE_WAIT."""
        import glide  # optional: only a gateway with a tier gets here

        while True:
            if not self._waiting:
                await self._entries_added.wait()
                self._entries_added = trio.Event()
                continue
            due = self._waiting_since + STORE_WAIT
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue  # a lookup may have carried them, and others come since
            entries, self._waiting = self._waiting, []
            now = time.time()
            ttl_ms = self._ttl_ms()
            expiry = glide.ExpirySet(glide.ExpiryType.MILLSEC, ttl_ms) if ttl_ms else None
            batch = glide.Batch(is_atomic=False)
            for key, response in entries:
                batch.set(entry_name(key), encode(key, response, now), expiry=expiry)

            async def write(client: glide.GlideClient, batch: glide.Batch = batch) -> object:
                return await client.exec(batch, raise_on_error=False)

            try:
                answers = await self.tier.call(write)
            except TierUnavailable:
                continue
            assert isinstance(answers, list)
            self.stored += sum(1 for answer in answers if answer == "OK")

    def _ttl_ms(self) -> int:
        return math.ceil(self.ttl * 1000)

    async def clear(self) -> int:
        """Unlink every L2 entry, then every flight lease (SCAN + UNLINK on each prefix); how
        many entries went. TierUnavailable if the tier fails or the sweep outruns CLEAR_BUDGET.

        The leases go too: a flight that succeeded leaves its lease to expire while its answer
        is in L2, and a lease whose answer is gone would make the next request follow a silent
        flight until the lease ran out. A flight still running loses its followers' watch: the
        ones that sent nothing take over, as when a leader dies."""
        with trio.move_on_after(CLEAR_BUDGET):
            unlinked = await self._unlink_all(entry_name("*"))
            await self._unlink_all(lease_name("*"))
            return unlinked
        raise TierUnavailable(f"the sweep did not end within {CLEAR_BUDGET:g} s")

    async def _unlink_all(self, pattern: str) -> int:
        budget = 2 * self.tier.settings.timeout  # glide's own bound on one command

        async def page(client: glide.GlideClient, at: bytes) -> list[bytes | list[bytes]]:
            return await client.scan(at, match=pattern, count=CLEAR_PAGE)

        async def unlink(client: glide.GlideClient, names: list[bytes]) -> int:
            return await client.unlink(list(names))

        cursor, unlinked = b"0", 0
        while True:
            answer = await self.tier.call(partial(page, at=cursor), budget)
            next_cursor, names = answer[0], answer[1]
            assert isinstance(next_cursor, bytes) and isinstance(names, list)
            cursor = next_cursor
            if names:
                unlinked += await self.tier.call(partial(unlink, names=names), budget)
            if cursor == b"0":
                return unlinked

    async def _lookup(self, key: str) -> tuple[list[object], str]:
        """The script's answer for `key`, from the call of its batch of lookups, and the id it
        would lead under."""
        lookups = self._gathering
        if lookups is not None:
            lookups.ids.setdefault(key, self.flights.new_id())
            # No deadline of its own: the sender's budget bounds the batch, and its `finally`
            # sets `done` whatever happens (a scope per lookup cost a deadline each).
            await lookups.done.wait()
        else:
            lookups = self._gathering = _Lookups()
            lookups.ids[key] = self.flights.new_id()
            # The others of the batch are answered with ours: leaving early (the client left)
            # would strand them, and the tier's budget bounds the wait.
            with trio.CancelScope(shield=True):
                try:
                    await self._send(lookups)
                finally:
                    if not lookups.done.is_set():  # only a bug gets here: a miss, not a hang
                        if self._gathering is lookups:
                            self._gathering = None
                        lookups.failed = True
                        lookups.done.set()
        if lookups.failed:
            raise TierUnavailable("the lookup failed")
        return lookups.answers[key], lookups.ids[key]

    async def _send(self, lookups: _Lookups) -> None:
        """Send a batch once the scheduling round that began it is over and the batch before
        it has its answer: under load, the lookups that come while one call is out all go in
        the next, so the calls do not grow with the requests. A batch with no call out waits for
        the loop to run out of work, at most `[shared] lookup_hold` (0.5 ms): on a busy worker
        the requests it is parsing and the answers it is relaying bring their lookups along
        (on a quiet machine 4 points of CPU per cold request less than without). Both
        waits count against the batch's budget: a lookup still costs at most one budget."""
        now = trio.current_time()
        deadline = now + self.tier.settings.timeout
        hold = self.tier.settings.lookup_hold
        if hold and self._sending is None:
            # Runnable tasks are requests (and their answers) the loop is still working on:
            # their lookups join this call rather than start the next. An idle loop sends now.
            with trio.move_on_at(min(now + hold, deadline)):
                await wait_all_tasks_blocked()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while self._sending is not None:
            with trio.move_on_at(deadline):
                await self._sending.wait()
            if trio.current_time() >= deadline:
                break
        self._gathering = None
        if trio.current_time() >= deadline:
            lookups.failed = True  # the one before took the whole budget: a miss, no call
            lookups.done.set()
            return
        self._sending = lookups.done
        try:
            await self._run(lookups, deadline - trio.current_time())
        finally:
            self._sending = None

    async def _run(self, lookups: _Lookups, budget: float) -> None:
        keys = list(lookups.ids)
        entries, self._waiting = self._waiting, []
        now = time.time()
        names = [name for key in keys for name in (entry_name(key), lease_name(key))]
        names += [entry_name(key) for key, _ in entries]
        looked_at, marks = self.flights.watch_marks(trio.current_time())
        names += marks
        args: list[str | bytes] = [str(self.flights.lease_ms), str(self._ttl_ms()), str(len(keys))]
        args += [*lookups.ids.values(), *(encode(key, entry, now) for key, entry in entries)]
        script = self._script
        try:
            answers = await self.tier.call(
                lambda client: client.invoke_script(script, keys=names, args=args), budget
            )
            expected = len(keys) + (1 if marks else 0)
            if not isinstance(answers, list) or len(answers) != expected:
                raise TierUnavailable(f"unexpected answer from the lookup script: {answers!r}")
            if marks:
                self.flights.note_watched(looked_at, answers.pop())
            lookups.answers = dict(zip(keys, answers, strict=True))
            self.stored += len(entries)
        except TierUnavailable:
            lookups.failed = True
        finally:
            lookups.done.set()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
