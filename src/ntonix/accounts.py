"""The gateway's token accounts: who used how many tokens (the ledger), and the token limits.

The proxy charges a response's tokens when it ends (ntonix.backend_slots) and the front door asks,
before a request, whether its key may start one (ntonix.app). Both read the Trio clock for the
minute and the wall clock for the day. Without a shared tier the windows are this worker's
own: with `--workers N` each worker enforces a key's token limits on what it served. With one,
they are the tier's (ntonix.shared_tokens), for every worker and instance, and this worker's
own again whenever the tier cannot answer.
"""

from __future__ import annotations

import time

import trio

from ntonix.core.ledger import UsageBook, UsageFigures
from ntonix.core.telemetry import RequestRecord
from ntonix.core.tenants import Tenant
from ntonix.core.token_limits import Standing, TokenLimits, TokenWindows
from ntonix.core.usage import Usage
from ntonix.shared_tokens import SharedTokens
from ntonix.tier import TierUnavailable


class Accounts:
    def __init__(self) -> None:
        self.book = UsageBook()
        self.windows = TokenWindows()
        self.shared: SharedTokens | None = None  # set while the gateway runs with a tier

    def generated(self, record: RequestRecord, usage: Usage) -> None:
        """A backend generated `usage` for the request of `record`: log it, count it, charge
        it to the key's token limits."""
        record.usage = usage
        tenant = record.tenant
        if tenant is None:
            return
        now, wall = trio.current_time(), time.time()
        self.book.add(tenant.name, record.model or "", usage, cached=False, now=now, wall=wall)
        if tenant.counts_tokens:
            self.windows.charge(tenant.identity, usage.total, now, wall)
            if self.shared is not None:
                self.shared.charge(tenant.identity, usage.total, wall)

    def served(self, record: RequestRecord, usage: Usage) -> None:
        """The cache served `usage` without generating it: counted, never charged."""
        record.usage = usage
        tenant = record.tenant
        if tenant is None:
            return
        now, wall = trio.current_time(), time.time()
        self.book.add(tenant.name, record.model or "", usage, cached=True, now=now, wall=wall)

    async def standing(self, tenant: Tenant) -> Standing:
        limits = TokenLimits(tenant.tokens_per_minute, tenant.tokens_per_day)
        now, wall = trio.current_time(), time.time()
        if self.shared is not None:
            try:
                return await self.shared.standing(tenant.identity, limits, now, wall)
            except TierUnavailable:
                pass  # what this worker served, as without a tier
        return self.windows.standing(tenant.identity, limits, now, wall)

    def figures(self) -> UsageFigures:
        return self.book.figures(trio.current_time())
