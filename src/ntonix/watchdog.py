"""The idle timeout of streams, kept by one task per worker instead of a deadline per chunk.

Moving a cancel scope's deadline before and after every upstream read put two changes per chunk
into Trio's deadline heap, the most frequent timer operation of a busy worker. Here a relay only
notes, per chunk, until when its backend may stay silent (a float, no timer), and one task wakes
every `tick` seconds and cancels the relays whose backend has been silent past that.

Invariants: a relay is cancelled only while it waits for its backend (never while it writes to
its client, which is back-pressure, not a silent backend); a backend silent for `idle_timeout`
is cut after between `idle_timeout` and `idle_timeout + tick` seconds; a relay that leaves
(however it ends) is forgotten at once.
"""

from __future__ import annotations

import math

import trio

# How often the watch looks: the idle timeout is that coarse (at most a quarter of the timeout).
TICK = 1.0


class Silence:
    """One relay under watch: until when its backend may stay silent (inf while it writes)."""

    __slots__ = ("expires", "scope")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.expires = math.inf


class IdleWatch:
    """The relays of one worker, checked once per `tick` by `run` (a supervisor task)."""

    def __init__(self) -> None:
        self._watched: set[Silence] = set()
        self.tick = TICK
        self.expired = 0  # relays cancelled for silence, since start

    def timeout(self, idle_timeout: float) -> None:
        """Adopt the configured idle timeout: look at least four times per timeout."""
        self.tick = min(TICK, idle_timeout / 4)

    def watch(self, scope: trio.CancelScope) -> Silence:
        silence = Silence(scope)
        self._watched.add(silence)
        return silence

    def forget(self, silence: Silence) -> None:
        self._watched.discard(silence)

    def check(self, now: float) -> None:
        for silence in self._watched:
            if silence.expires <= now:
                silence.expires = math.inf  # cancelled once; it leaves at its next checkpoint
                silence.scope.cancel()
                self.expired += 1

    async def run(self) -> None:
        while True:
            await trio.sleep(self.tick)
            self.check(trio.current_time())
