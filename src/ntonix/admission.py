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

    Waiters of one `group` (the proxy's: the model and the backends already tried) can use the
    same slots, so once one of them found none in a round, the rest of its group are not asked
    again in that round: a round costs one try per group, not one per waiter, however long
    the queue.
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
        full: set[object] = set()  # groups that found no slot this round (slots only go)
        for entry in self._queue.order(trio.current_time()):
            waiter = entry.item
            if waiter.group in full:
                continue
            ticket = waiter.try_admit()
            if ticket is None:
                if waiter.group is not None:
                    full.add(waiter.group)
            else:
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
        group: object = None,
    ) -> Ticket | None:
        """The ticket a freed slot brought, or None when `deadline` passed first. Waiters of
        one `group` (hashable; None: a group of its own) must be able to use the same slots."""
        waiter = _Waiter(try_admit, group)
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
    __slots__ = ("admitted", "group", "ticket", "try_admit")

    def __init__(self, try_admit: Callable[[], Ticket | None], group: object) -> None:
        self.try_admit = try_admit
        self.group = group
        self.admitted = trio.Event()
        self.ticket: Ticket | None = None
