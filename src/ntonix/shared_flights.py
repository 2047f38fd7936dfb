"""Coalescing across workers and instances: identical requests in flight anywhere on the shared
tier make one backend request.

A request that misses both cache levels, with no flight of its own worker to join, takes the
key's lease in Valkey (`ntonix:flight:<key>`, holding the flight's id and expiring `[shared]
lease` seconds after its last renewal) in the same call that looked for the entry. Its worker
leads. A worker that finds the lease held follows: it marks the flight watched, and runs a
local flight, which its own identical requests join as usual (back-pressure and "the last
listener leaving cancels" keep their meaning per worker), fed from the leader's stream
(`ntonix:stream:<id>`: the head, the pieces, then how it ended; capped and expiring): what
was published so far, then the rest as it comes. The leader publishes a flight once it sees
it watched (it looks every WATCH_EVERY: in the worker's lookup calls while there are any, else
with a call of its own), so a flight nobody follows costs no stream.

One task per worker publishes every leading flight (one pipeline per TICK; while none is
watched it wakes only every WATCH_EVERY, to look) and one reads every following flight (one
XREAD per TICK), so the calls grow with time, not with pieces or flights.

A leader that dies stops renewing: once its lease is gone (or the tier's breaker is open, or
its stream was unreadable for a lease), a following flight that has sent nothing to any client
takes the lease and goes upstream itself (or, with the tier gone, goes upstream alone); one
that has sent something ends with an error frame. A leader whose flight failed releases the
lease so the next request tries again; one that succeeded leaves it to expire, while its
answer is in the cache.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from ntonix.errors import GatewayError
from ntonix.flight_stream import (
    END_OK,
    Following,
    LeaderLost,
    Leading,
    apply_entry,
    end_of,
    entry_of_cached,
    news,
    text_of,
)
from ntonix.shared_keys import entry_name, lease_name, stream_name, watch_name
from ntonix.tier import SharedTier, TierUnavailable

if TYPE_CHECKING:
    from ntonix.cache import Flight

log = logging.getLogger("ntonix.shared")

TICK = 0.01  # seconds between the publisher's pipelines and the reader's XREADs
WATCH_EVERY = 0.05  # seconds between looks for new followers of the flights led
STREAM_CAP = 100_000  # entries a stream keeps (a flight stops at 8 MiB long before)
READ_COUNT = 256  # entries read per stream and tick
# A followed stream silent this long has its lease and its cache entry looked at (a leader can
# end, its answer stored, before it saw its follower), then again every SILENT_CHECK.
SILENT_CHECK = 0.25
QUEUED = 1024  # entries a following flight may hold unapplied before reading pauses for it

# The one call a batch of lookups makes: first the entries waiting to be stored (SET with the
# TTL), then per key its entry, else its flight's lease, then whether each flight named is
# watched. KEYS: per key looked up its entry and its lease, the names of the entries to store,
# then the watch marks to look at. ARGV: the lease in ms, the TTL in ms (0: none), how many keys
# are looked up, the id each would lead under, then the values to store. Per key looked up:
# {1, the entry}, {2} (the lease is ours: lead) or {3, its holder}; then, if marks were asked
# for, one more item: 1 or 0 per mark.
LOOKUP = """
local lease, ttl, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local stores = #ARGV - 3 - n
for j = 1, stores do
  local name, value = KEYS[2 * n + j], ARGV[3 + n + j]
  if ttl > 0 then redis.call('SET', name, value, 'PX', ttl)
  else redis.call('SET', name, value) end
end
local out = {}
for i = 1, n do
  local value = redis.call('GET', KEYS[2 * i - 1])
  if value then
    out[i] = {1, value}
  else
    local holder = redis.call('SET', KEYS[2 * i], ARGV[3 + i], 'NX', 'PX', lease, 'GET')
    if holder then out[i] = {3, holder} else out[i] = {2} end
  end
end
if #KEYS > 2 * n + stores then
  local marks = {}
  for j = 2 * n + stores + 1, #KEYS do marks[#marks + 1] = redis.call('EXISTS', KEYS[j]) end
  out[n + 1] = marks
end
return out
"""
# KEYS: the lease of the flight. ARGV: the flight id that must hold it.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"


@attrs.frozen
class Lead:
    """This worker holds the key's lease: its flight is published under `flight_id`."""

    flight_id: str


@attrs.frozen
class Follow:
    """Another flight holds the key's lease: follow its stream."""

    flight_id: str


class SharedFlights:
    """The leading and following flights of one worker, and the two tasks that serve them."""

    def __init__(self, tier: SharedTier, lease: float) -> None:
        self.tier = tier
        self.lease = lease
        self.lease_ms = math.ceil(lease * 1000)
        self._worker = secrets.token_hex(8)
        self._ids = itertools.count()
        self._leading: list[Leading] = []
        self._following: dict[str, Following] = {}
        self._watch_checked_at = -math.inf
        self._leaders_added = trio.Event()
        self._followers_added = trio.Event()
        self.led = self.followed = self.taken_over = self.lost = 0

    def new_id(self) -> str:
        return f"{self._worker}-{next(self._ids)}"

    def lead(self, flight: Flight, key: str, flight_id: str) -> None:
        """Publish `flight` until it ends (the lease is held already)."""
        self.led += 1
        self._leading.append(Leading(flight, key, flight_id, renewed_at=trio.current_time()))
        self._leaders_added.set()

    def follower(
        self, key: str, flight_id: str, upstream: Callable[[Flight], Awaitable[None]]
    ) -> Callable[[Flight], Awaitable[None]]:
        """The `run` of a following flight; `upstream` is what it runs if it takes over."""

        async def run(flight: Flight) -> None:
            self.followed += 1
            await self._follow(flight, key, flight_id, upstream)

        return run

    async def _follow(
        self,
        flight: Flight,
        key: str,
        flight_id: str,
        upstream: Callable[[Flight], Awaitable[None]],
    ) -> None:
        while True:
            await self._watch(flight_id)
            following = Following(key, flight_id, heard_at=trio.current_time())
            self._following[flight_id] = following
            self._followers_added.set()
            try:
                if await self._replay(flight, following):
                    return
            finally:
                self._following.pop(flight_id, None)
            # The leader is gone.
            if flight.committed:
                self.lost += 1
                raise GatewayError(
                    502, "backend_failed", "The shared upstream request was lost", source="gateway"
                )
            new_id = self.new_id()
            try:
                answer = await self._take_over(key, new_id)
            except TierUnavailable:
                await self._go_upstream(flight, upstream)  # the tier is gone: on our own
                return
            if answer[0] == 1:  # its answer is in the cache after all
                entry = entry_of_cached(key, answer[1])
                if entry is None:  # an unusable entry is a miss: on our own
                    await self._go_upstream(flight, upstream)
                else:
                    await apply_entry(flight, key, entry)
                return
            if answer[0] == 2:
                self.lead(flight, key, new_id)
                await self._go_upstream(flight, upstream)
                return
            owner = text_of(answer[1])
            if owner == flight_id:
                await trio.sleep(TICK)  # its lease is not released yet: ask again
            flight_id = owner  # else another follower took over first: follow it

    async def _go_upstream(
        self, flight: Flight, upstream: Callable[[Flight], Awaitable[None]]
    ) -> None:
        """Take over: the flight asks the backend itself, and stores what it gets."""
        self.taken_over += 1
        flight.follower = False
        await upstream(flight)

    async def _replay(self, flight: Flight, following: Following) -> bool:
        """Apply the stream's entries to `flight` until it ends (True) or is lost (False)."""
        while True:
            while following.entries:
                entry = following.entries.popleft()
                try:
                    if await apply_entry(flight, following.key, entry):
                        return True
                except LeaderLost:
                    return False
            if following.lost:
                return False
            await following.changed.wait()

    async def _watch(self, flight_id: str) -> None:
        """Tell the leader someone follows (unheard, its lease lapses and we take over)."""
        command = ["SET", watch_name(flight_id), "1", "PX", str(2 * self.lease_ms)]
        with contextlib.suppress(TierUnavailable):
            await self.tier.call(lambda client: client.custom_command(command))

    async def _take_over(self, key: str, flight_id: str) -> list[object]:
        """The key's entry, else its lease for `flight_id`: the lookup script's answer."""
        from glide import Script  # optional: only a gateway with a tier gets here

        script = Script(LOOKUP)  # type: ignore[no-untyped-call]
        names = [entry_name(key), lease_name(key)]
        args = [str(self.lease_ms), "0", "1", flight_id]
        answers = await self.tier.call(
            lambda client: client.invoke_script(script, keys=names, args=args)
        )
        if not isinstance(answers, list) or len(answers) != 1:
            raise TierUnavailable(f"unexpected answer from the lookup script: {answers!r}")
        answer: list[object] = answers[0]
        return answer

    # --- the two tasks ---------------------------------------------------------------------

    async def publish_forever(self) -> None:
        """Every TICK, one pipeline: new entries of every leading flight, lease renewals.
        While no flight led is watched, every WATCH_EVERY: there is nothing to publish before
        a look finds a follower, and each wake-up of a busy worker costs CPU."""
        while True:
            if not self._leading:
                await self._leaders_added.wait()
                self._leaders_added = trio.Event()
            watched = any(leading.watched for leading in self._leading)
            await trio.sleep(TICK if watched else WATCH_EVERY)
            await self._publish()

    async def read_forever(self) -> None:
        """Every TICK, one XREAD over every following flight; leases checked when silent."""
        while True:
            if not self._following:
                await self._followers_added.wait()
                self._followers_added = trio.Event()
            await trio.sleep(TICK)
            await self._read()

    async def _publish(self) -> None:
        import glide  # optional: only a gateway with a tier gets here

        now = trio.current_time()
        await self._find_watched(now)
        batch = glide.Batch(is_atomic=False)
        ended: list[tuple[Leading, bytes]] = []
        commands = 0
        for leading in self._leading:
            end = end_of(leading.flight)
            if leading.watched and (fields := news(leading, end)):
                leading.sequence += 1
                fields.insert(0, (b"n", str(leading.sequence).encode()))
                stream = stream_name(leading.flight_id)
                batch.custom_command(
                    ["XADD", stream, "MAXLEN", "~", str(STREAM_CAP), "*"]
                    + [part for pair in fields for part in pair]
                )
                batch.pexpire(stream, 2 * self.lease_ms)
                commands += 2
            if end is not None:
                ended.append((leading, end))
            elif now - leading.renewed_at >= self.lease / 3:
                leading.renewed_at = now
                batch.pexpire(lease_name(leading.key), self.lease_ms)
                commands += 1
        if commands:
            with contextlib.suppress(TierUnavailable):  # followers notice the silence
                await self.tier.call(lambda client: client.exec(batch, raise_on_error=False))
        for leading, end in ended:
            self._leading.remove(leading)
            if end != END_OK:  # the next request tries again (or a follower takes over)
                await self._release(leading)

    def watch_marks(self, now: float) -> tuple[list[Leading], list[str]]:
        """The leading flights whose watch marks a call should look at (every one not known
        to be watched), and the marks' names. Every lookup call carries them: an EXISTS each
        in its script costs the gateway next to nothing, and on a busy worker `_find_watched`
        then makes no call of its own."""
        unwatched = [leading for leading in self._leading if not leading.watched]
        if unwatched:
            self._watch_checked_at = now
        return unwatched, [watch_name(leading.flight_id) for leading in unwatched]

    def note_watched(self, looked_at: list[Leading], marks: list[object]) -> None:
        """What a look at the marks of `looked_at` found (truthy: someone follows)."""
        for leading, mark in zip(looked_at, marks, strict=True):
            leading.watched = leading.watched or bool(mark)

    async def _find_watched(self, now: float) -> None:
        """Which leading flights have followers now, if no lookup call looked within
        WATCH_EVERY: one MGET."""
        if now - self._watch_checked_at < WATCH_EVERY:
            return
        unwatched, names = self.watch_marks(now)
        if not unwatched:
            return
        try:
            marks = await self.tier.call(lambda client: client.mget(list(names)))
        except TierUnavailable:
            return
        self.note_watched(unwatched, [mark is not None for mark in marks])

    async def _release(self, leading: Leading) -> None:
        from glide import Script  # optional: only a gateway with a tier gets here

        script = Script(_RELEASE)  # type: ignore[no-untyped-call]
        with contextlib.suppress(TierUnavailable):
            await self.tier.call(
                lambda client: client.invoke_script(
                    script, keys=[lease_name(leading.key)], args=[leading.flight_id]
                )
            )

    async def _read(self) -> None:
        import glide  # optional: only a gateway with a tier gets here

        now = trio.current_time()
        wanted = {
            stream_name(flight_id): following.last_id
            for flight_id, following in self._following.items()
            if len(following.entries) < QUEUED and not following.lost
        }
        if not wanted:
            return
        options = glide.StreamReadOptions(count=READ_COUNT)
        try:
            answer = await self.tier.call(lambda client: client.xread(wanted, options))
        except TierUnavailable:
            # With the tier's breaker open nothing more will come: go on without it now.
            for following in self._following.values():
                heard = max(following.heard_at, following.checked_at)
                if now - heard > self.lease or not self.tier.up:
                    following.lose()
            return
        for stream, entries in (answer or {}).items():
            reading = self._following.get(text_of(stream).removeprefix("ntonix:stream:"))
            if reading is None:
                continue
            reading.take(entries, now)
        silent = [
            following
            for following in self._following.values()
            if now - max(following.heard_at, following.checked_at) > SILENT_CHECK
            and not following.lost
        ]
        if silent:
            await self._check_silent(silent, now)

    async def _check_silent(self, silent: list[Following], now: float) -> None:
        """For each silent stream, its lease and its cache entry in one MGET: an entry is the
        answer (its leader ended before it saw us); a lease gone or changed hands is a loss."""
        names = [name for f in silent for name in (lease_name(f.key), entry_name(f.key))]
        try:
            values = await self.tier.call(lambda client: client.mget(list(names)))
        except TierUnavailable:
            return  # counted as silence: lost after a lease
        for index, following in enumerate(silent):
            following.checked_at = now
            holder, value = values[2 * index], values[2 * index + 1]
            entry = entry_of_cached(following.key, value) if following.sequence == 0 else None
            if entry is not None:
                following.entries.append(entry)
                following.notify()
            elif holder is None or text_of(holder) != following.flight_id:
                following.lose()
