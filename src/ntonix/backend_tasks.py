"""One long-lived task per configured backend, kept in step with the config across reloads.

Invariant: exactly one task runs per backend name; a backend whose settings changed (or any
backend, when the shared settings changed) has its task cancelled and a new one started.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import trio

from ntonix.config import BackendSettings, HealthSettings


class BackendTasks:
    """The tasks; a subclass says what each one does (`work`)."""

    def __init__(self, nursery: trio.Nursery, settings: HealthSettings) -> None:
        self._nursery = nursery
        self._settings = settings
        self._rng = random.Random()
        self._running: dict[str, tuple[BackendSettings, trio.CancelScope]] = {}

    def reconcile(self, backends: Iterable[BackendSettings], settings: HealthSettings) -> None:
        wanted = {backend.name: backend for backend in backends}
        changed = settings != self._settings
        self._settings = settings
        for name, (backend, scope) in list(self._running.items()):
            if changed or wanted.get(name) != backend:
                scope.cancel()
                del self._running[name]
        for name, backend in wanted.items():
            if name not in self._running:
                scope = trio.CancelScope()
                self._running[name] = (backend, scope)
                self._nursery.start_soon(self._run, backend, scope)

    async def _run(self, backend: BackendSettings, scope: trio.CancelScope) -> None:
        with scope:
            await self.work(backend, self._settings, self._rng)

    async def work(
        self, backend: BackendSettings, settings: HealthSettings, rng: random.Random
    ) -> None:
        raise NotImplementedError
