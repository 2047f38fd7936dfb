"""The admission queue: requests waiting for a slot on a backend at `max_concurrent`."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from ntonix.core.health import Ticket


class Admission:
    """Requests waiting for a slot on a backend at max_concurrent, first come first served.

    Admitting is synchronous: whenever a slot may have freed, the waiters are offered it in
    arrival order, and the first that can use it gets it at once. No wake-up is lost, and one
    waiting for a full backend does not hold back one behind it that another backend can take.
    """

    def __init__(self) -> None:
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def admit_waiting(self) -> None:
        if not self._waiters:
            return
        for waiter in list(self._waiters):
            ticket = waiter.try_admit()
            if ticket is not None:
                self._waiters.remove(waiter)
                waiter.ticket = ticket
                waiter.admitted.set()

    async def wait(
        self,
        try_admit: Callable[[], Ticket | None],
        deadline: float,
        abandon: Callable[[Ticket], None],
    ) -> Ticket | None:
        """The ticket a freed slot brought, or None when `deadline` passed first."""
        waiter = _Waiter(try_admit)
        self._waiters.append(waiter)
        try:
            with trio.move_on_at(deadline):
                await waiter.admitted.wait()
        except BaseException:
            if waiter.ticket is not None:  # admitted, but its client left meanwhile
                abandon(waiter.ticket)
            raise
        finally:
            if waiter.ticket is None:
                self._waiters.remove(waiter)
        return waiter.ticket


class _Waiter:
    __slots__ = ("admitted", "ticket", "try_admit")

    def __init__(self, try_admit: Callable[[], Ticket | None]) -> None:
        self.try_admit = try_admit
        self.admitted = trio.Event()
        self.ticket: Ticket | None = None
