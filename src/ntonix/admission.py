"""The admission queue: requests waiting for a slot on a backend at `max_concurrent`."""

from __future__ import annotations

from collections.abc import Callable

import trio

from ntonix.core.fair_queue import Entry, FairQueue
from ntonix.core.health import Ticket
from ntonix.core.tenants import Tenant

DEFAULT_AGING = 10.0  # seconds; the config's [gateway] batch_aging replaces it


class Admission:
    """Requests waiting for a slot on a backend at max_concurrent, in fair order.

    Admitting is synchronous: whenever a slot may have freed, the waiters are offered it in the
    fair queue's order (core/fair_queue.py: interactive before batch, keys by weight, each key
    first come first served), and the first that can use it gets it at once. No wake-up is
    lost, and one waiting for a full backend does not hold back one behind it that another
    backend can take. A waiter whose client leaves is out of the queue at once.
    """

    def __init__(self, aging: float = DEFAULT_AGING) -> None:
        self._queue: FairQueue[_Waiter] = FairQueue(aging)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def aging(self) -> float:
        return self._queue.aging

    @aging.setter
    def aging(self, seconds: float) -> None:
        self._queue.aging = seconds

    def admit_waiting(self) -> None:
        if not self._queue:
            return
        for entry in self._queue.order(trio.current_time()):
            waiter = entry.item
            ticket = waiter.try_admit()
            if ticket is not None:
                self._queue.remove(entry)
                self._queue.served(entry.key, entry.weight)
                waiter.ticket = ticket
                waiter.admitted.set()

    def served(self, tenant: Tenant | None) -> None:
        """A request took a slot without queueing: it still counts as its key's turn."""
        key, weight = _fair_key(tenant)
        self._queue.served(key, weight)

    async def wait(
        self,
        try_admit: Callable[[], Ticket | None],
        deadline: float,
        abandon: Callable[[Ticket], None],
        tenant: Tenant | None = None,
    ) -> Ticket | None:
        """The ticket a freed slot brought, or None when `deadline` passed first."""
        waiter = _Waiter(try_admit)
        key, weight = _fair_key(tenant)
        batch = tenant is not None and tenant.batch
        entry: Entry[_Waiter] = self._queue.push(
            waiter, key, weight=weight, batch=batch, now=trio.current_time()
        )
        try:
            with trio.move_on_at(deadline):
                await waiter.admitted.wait()
        except BaseException:
            if waiter.ticket is not None:  # admitted, but its client left meanwhile
                abandon(waiter.ticket)
            raise
        finally:
            if waiter.ticket is None:
                self._queue.remove(entry)
        return waiter.ticket


def _fair_key(tenant: Tenant | None) -> tuple[str, int]:
    return (tenant.identity, tenant.weight) if tenant is not None else ("", 1)


class _Waiter:
    __slots__ = ("admitted", "ticket", "try_admit")

    def __init__(self, try_admit: Callable[[], Ticket | None]) -> None:
        self.try_admit = try_admit
        self.admitted = trio.Event()
        self.ticket: Ticket | None = None
