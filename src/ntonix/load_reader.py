"""Reading the engines' own load: one task per backend in the supervisor nursery.

Beside each prober runs a reader that asks the backend what it already serves about its load
(`/metrics`, llama.cpp's `/slots`, Ollama's `/api/ps`; core/engines.py parses them) every
`health.load_interval` with +-20% jitter, under its own `health.load_timeout`, and writes the
reading into the load book. Requests never wait for a reader: they use the last reading, which
the book ignores once it is older than three intervals. With `engine = "auto"` the reader tries
the paths in turn and keeps the first engine that answers; a backend that serves no signal is
asked again only every `health.interval` (the probe period), and counts by local requests
meanwhile. A reader never dies of an unexpected error: it logs it and reads again next period.
"""

from __future__ import annotations

import json
import logging
import random
import ssl

import httpx
import trio

from ntonix.backend_tasks import BackendTasks
from ntonix.config import BackendSettings, HealthSettings
from ntonix.core.engines import (
    METRICS_ENGINES,
    LoadReading,
    SignalError,
    read_llamacpp_slots,
    read_metrics,
    read_ollama_ps,
)
from ntonix.core.health import HealthTable
from ntonix.core.signals import LoadBook
from ntonix.upstream import backend_ssl_context

log = logging.getLogger("ntonix.load")

NO_SIGNAL = "none"


class NoSignal(Exception):
    """The backend serves nothing we can read at this path."""


async def _get(client: httpx.AsyncClient, url: str) -> httpx.Response:
    response = await client.get(url)
    if response.status_code != 200:
        raise NoSignal(f"GET {httpx.URL(url).path} answered {response.status_code}")
    return response


async def _read(client: httpx.AsyncClient, base: str, engine: str) -> LoadReading:
    """One reading from the paths `engine` serves ("auto": whichever answers first)."""
    problems = []
    if engine in (*METRICS_ENGINES, "auto"):
        try:
            response = await _get(client, base + "/metrics")
            return read_metrics(response.text, None if engine == "auto" else engine)
        except (NoSignal, SignalError) as problem:
            problems.append(str(problem))
    if engine in ("ollama", "auto"):
        try:
            return read_ollama_ps(_json(await _get(client, base + "/api/ps")))
        except (NoSignal, SignalError) as problem:
            problems.append(str(problem))
    if engine in ("llamacpp", "auto"):
        # llama-server without --metrics still lists its slots.
        try:
            return read_llamacpp_slots(_json(await _get(client, base + "/slots")))
        except (NoSignal, SignalError) as problem:
            problems.append(str(problem))
    raise NoSignal("; ".join(problems))


def _json(response: httpx.Response) -> object:
    try:
        return json.loads(response.content)
    except ValueError as error:
        raise SignalError(f"not JSON: {error}") from error


async def read_once(
    client: httpx.AsyncClient, backend: BackendSettings, book: LoadBook, engine: str
) -> str:
    """Read the backend's load into the book; the engine to ask next time."""
    taken_at = trio.current_time()
    try:
        reading = await _read(client, backend.url.rstrip("/"), engine)
    except (NoSignal, SignalError) as problem:
        if engine == "auto":
            book.set_engine(backend.name, NO_SIGNAL)
        book.fail(backend.name, f"no load signal: {problem}")
        return engine
    except httpx.HTTPError as failure:
        book.fail(backend.name, f"load signals unreadable: {failure or type(failure).__name__}")
        return engine
    book.record(backend.name, reading, taken_at=taken_at, received_at=trio.current_time())
    return reading.engine


async def read_forever(
    backend: BackendSettings,
    health: HealthTable,
    book: LoadBook,
    settings: HealthSettings,
    rng: random.Random,
) -> None:
    """Read at once, then every `load_interval` (jittered); slower where nothing answers.

    Every `load_interval` it also tells the book whether the backend's circuit is closed, so a
    backend that comes back starts its slow start, signals or not.
    """
    book.set_engine(backend.name, "" if backend.engine == "auto" else backend.engine)
    context: ssl.SSLContext | bool = backend_ssl_context(backend) or True
    engine = backend.engine
    next_read = trio.current_time()
    # httpx's own timeout is a safety net; the deadline around each read is load_timeout.
    async with httpx.AsyncClient(timeout=settings.load_timeout * 2, verify=context) as client:
        while True:
            if engine != NO_SIGNAL and trio.current_time() >= next_read:
                try:
                    with trio.move_on_after(settings.load_timeout) as deadline:
                        engine = await read_once(client, backend, book, engine)
                    if deadline.cancelled_caught:
                        book.fail(
                            backend.name,
                            f"load signals did not arrive within {settings.load_timeout:g} s",
                        )
                except Exception:
                    log.exception("load read of %s crashed; reading again later", backend.name)
                quiet = book.engine(backend.name) == NO_SIGNAL
                next_read = trio.current_time() + (
                    max(settings.load_interval, settings.interval) if quiet else 0.0
                )
            now = trio.current_time()
            book.note_closed(backend.name, _closed(health, backend.name, now), now)
            await trio.sleep(settings.load_interval * rng.uniform(0.8, 1.2))


def _closed(health: HealthTable, name: str, now: float) -> bool:
    return any(s.state == "closed" for s in health.snapshot(now) if s.name == name)


class LoadReaders(BackendTasks):
    """The reader tasks, kept in step with the configured backends across reloads."""

    def __init__(
        self, nursery: trio.Nursery, health: HealthTable, book: LoadBook, settings: HealthSettings
    ) -> None:
        super().__init__(nursery, settings)
        self._health = health
        self._book = book

    async def work(
        self, backend: BackendSettings, settings: HealthSettings, rng: random.Random
    ) -> None:
        await read_forever(backend, self._health, self._book, settings, rng)
