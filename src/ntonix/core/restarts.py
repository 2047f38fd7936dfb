"""When the supervisor of `ntonix serve --workers N` replaces a worker that died.

Invariants: a worker that dies after running for `stable_after` seconds is replaced at once and
its record starts over; each death sooner than that is one more in a row, and waits
`first_backoff` doubled each time (up to `max_backoff`) before the replacement starts; the
`give_up_after`-th death in a row is not replaced: the decision says so, and the supervisor
stops the gateway. Pure: the caller says how long the worker lived.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class RestartPolicy:
    stable_after: float = 10.0  # seconds a worker must live for its death to start a new count
    first_backoff: float = 0.5  # seconds before the second replacement in a row
    max_backoff: float = 8.0
    give_up_after: int = 5  # deaths in a row, each sooner than stable_after

    def after_death(self, in_a_row: int, lived: float) -> Restart:
        """What to do about a worker that died after `lived` seconds, the worker in its place
        having died `in_a_row` times in a row before."""
        in_a_row = 1 if lived >= self.stable_after else in_a_row + 1
        if in_a_row >= self.give_up_after:
            return Restart(in_a_row, None)
        delay = 0.0 if in_a_row == 1 else self.first_backoff * 2 ** (in_a_row - 2)
        return Restart(in_a_row, min(delay, self.max_backoff))


@attrs.frozen
class Restart:
    in_a_row: int
    delay: float | None  # seconds before the replacement starts; None: do not replace
