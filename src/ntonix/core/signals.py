"""The load book: each backend's last engine reading, its age, our latency and slow start.

Invariants: the readers write (`record`, `fail`, `note_closed`), the proxy writes what it alone
knows (`sent`, `finished`, `observe_ttfb`) and reads `annotate`; nothing here awaits or reads a
clock, time comes in as `now`. A reading older than `STALE_AFTER` load intervals is ignored: the
backend then counts by this worker's own requests, as under least-connections (its loaded models
count for `RESIDENCY_STALE_AFTER` intervals). A reading is brought up to now with this worker's
requests: what the engine reported, less our requests it counted, plus ours in flight now, so
requests sent since the reading count once and requests since finished stop counting. Which of
ours it counted is known only up to the moment of its snapshot, somewhere between our question
and its answer: a request of ours that finished in that window and one sent in it cannot both
have been counted. So the count of ours is what was on the engine at one moment of the window,
and of the counts the window allows, the one that changes least what we last learned of the
others' load (theirs moves little in a few milliseconds; ours we know). Counting every request
of the window instead undercounts the backend by one for each finish-then-send that a reading
straddles: enough to queue two behind one while the other backend queues none. An engine that
does not report its capacity (vLLM, SGLang, TGI) shows it when it queues: the most requests it
ran while others waited is its learned capacity (raised when it runs more without a queue).
Until then its KV cache tells: r requests filling a fraction k of it make room for about r / k;
and without either, it is taken to be like its peers of the same engine (replicas usually are),
else unknown. How long our requests hold a backend (sent to finished, whatever the outcome: a
slot is free again either way) is kept as a moving average: it tells how fast a backend's queue
drains. Slow start ramps linearly from `RAMP_FLOOR` to 1 over `slow_start` seconds after a
backend's circuit closes again or a reload adds it; backends present at start do not ramp.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from ntonix.core.balancer import Candidate, Signals
from ntonix.core.engines import LoadReading, serves_loaded

STALE_AFTER = 3  # load intervals
RESIDENCY_STALE_AFTER = 30  # load intervals: which models are loaded goes stale more slowly
RAMP_FLOOR = 0.1
LATENCY_ALPHA = 0.2  # weight of the newest TTFB sample: ~10 requests of memory


@attrs.frozen
class LoadStatus:
    """One backend's signals as /ntonix/status, the dashboard and /metrics show them."""

    engine: str  # configured or detected; "" until known, "none" when it serves no signal
    reading: LoadReading | None
    age: float | None  # seconds since the reading was taken
    stale: bool
    error: str  # why the last read failed; "" after a good one
    estimated_load: int | None  # the reading brought up to now; None when stale or absent
    capacity: int | None  # as reported, else as learned from a queue
    ramp: float
    ttfb: dict[str, float]  # EWMA seconds per model ("" = the backend over all models)
    hold: float | None = None  # EWMA seconds our requests held the backend


@attrs.define
class _Entry:
    engine: str = ""
    reading: LoadReading | None = None
    taken_at: float = 0.0
    ours_then: int = 0  # this worker's requests the reading counted
    others: int | None = None  # the rest of the reading: other clients' requests
    sent: dict[int, float] = attrs.Factory(dict)  # our requests in flight: ticket -> sent at
    done: list[tuple[float, float]] = attrs.Factory(list)  # (sent, finished) since last reading
    error: str = ""
    learned_capacity: int | None = None
    kv_capacity: int | None = None  # requests that would fill the KV cache, at the last reading
    closed: bool = True
    ramp_from: float | None = None
    ttfb: dict[str, float] = attrs.Factory(dict)
    hold: float | None = None


class LoadBook:
    """What the engines last said about each backend, kept by name."""

    def __init__(self, *, interval: float = 1.0, slow_start: float = 30.0) -> None:
        self.interval = interval
        self.slow_start = slow_start
        self._entries: dict[str, _Entry] = {}
        self._started = False

    def configure(self, *, interval: float, slow_start: float) -> None:
        self.interval = interval
        self.slow_start = slow_start

    def reconcile(self, names: Iterable[str], now: float) -> None:
        """Follow the configured backends; one a reload adds starts its slow start now."""
        entries = {}
        for name in names:
            entry = self._entries.get(name)
            if entry is None:
                entry = _Entry(ramp_from=now if self._started else None)
            entries[name] = entry
        self._entries = entries
        self._started = True

    def sent(self, name: str, ticket: int, now: float) -> None:
        """Our request `ticket` is on its way to the engine: from now on readings count it."""
        if (entry := self._entries.get(name)) is not None:
            entry.sent[ticket] = now

    def finished(self, name: str, ticket: int, now: float) -> None:
        entry = self._entries.get(name)
        if entry is not None and (sent_at := entry.sent.pop(ticket, None)) is not None:
            entry.done.append((sent_at, now))
            entry.hold = _ewma(entry.hold, now - sent_at)

    def record(
        self, name: str, reading: LoadReading, *, taken_at: float, received_at: float
    ) -> None:
        """A good reading, asked for at `taken_at`, answered at `received_at`."""
        entry = self._entries.get(name)
        if entry is None:
            return
        spans: list[tuple[float, float | None]] = [(at, None) for at in entry.sent.values()]
        spans += entry.done
        entry.done.clear()  # finished before this reading was answered: no later one counts them
        reported = (reading.waiting or 0) + (reading.running or 0)
        least, most = ours_counted(spans, taken_at, received_at)
        # Nothing learned of the others yet: the engine took the busiest moment of ours.
        guess = most if entry.others is None else reported - entry.others
        ours = min(max(least, min(most, guess)), reported)
        entry.reading, entry.taken_at, entry.ours_then = reading, taken_at, ours
        entry.others = reported - ours
        entry.engine = reading.engine
        running = reading.running or 0
        if (reading.waiting and running) or (entry.learned_capacity or running) < running:
            entry.learned_capacity = max(entry.learned_capacity or 0, running)
        if running and reading.kv_usage:
            entry.kv_capacity = max(running, round(running / reading.kv_usage))
        entry.error = ""

    def fail(self, name: str, error: str) -> None:
        """A read that failed: the last reading stays until it goes stale."""
        if (entry := self._entries.get(name)) is not None:
            entry.error = error

    def set_engine(self, name: str, engine: str) -> None:
        if (entry := self._entries.get(name)) is not None:
            entry.engine = engine

    def engine(self, name: str) -> str:
        entry = self._entries.get(name)
        return entry.engine if entry is not None else ""

    def note_closed(self, name: str, closed: bool, now: float) -> None:
        """The backend's circuit is (not) closed now; closing again starts its slow start."""
        entry = self._entries.get(name)
        if entry is None:
            return
        if closed and not entry.closed:
            entry.ramp_from = now
        entry.closed = closed

    def observe_ttfb(self, name: str, model: str | None, seconds: float) -> None:
        """A completed request's time to first byte, for the backend and for its model."""
        entry = self._entries.get(name)
        if entry is None:
            return
        for key in {"", model or ""}:
            entry.ttfb[key] = _ewma(entry.ttfb.get(key), seconds)

    def ramp(self, name: str, now: float) -> float:
        """The share of its weight the backend takes now, RAMP_FLOOR..1."""
        entry = self._entries.get(name)
        if entry is None or entry.ramp_from is None or self.slow_start <= 0:
            return 1.0
        progress = (now - entry.ramp_from) / self.slow_start
        if progress >= 1:
            entry.ramp_from = None  # done: later calls take the short way
            return 1.0
        return RAMP_FLOOR + (1 - RAMP_FLOOR) * max(0.0, progress)

    def annotate(
        self, candidates: Sequence[Candidate], model: str | None, now: float
    ) -> list[Candidate]:
        """The candidates with their signals, for least-loaded (built directly: `attrs.evolve`
        reads the class's fields on every call, twice the cost of the constructor)."""
        return [
            Candidate(c.name, c.weight, c.in_flight, self.signals(c.name, c.in_flight, model, now))
            for c in candidates
        ]

    def signals(self, name: str, in_flight: int, model: str | None, now: float) -> Signals:
        entry = self._entries.get(name)
        if entry is None:
            return Signals()
        ramp = self.ramp(name, now)
        ttfb = entry.ttfb.get(model or "", entry.ttfb.get(""))
        reading = self._fresh(entry, now)
        if reading is None:
            last = entry.reading
            # Loaded models change in minutes, not seconds: residency outlives a stale queue.
            warm = None
            if (
                last is not None
                and model is not None
                and now - entry.taken_at <= (RESIDENCY_STALE_AFTER * self.interval)
            ):
                warm = serves_loaded(last, model)
            return Signals(ttfb=ttfb, hold=entry.hold, ramp=ramp, warm=warm)
        load = self._estimate(entry, reading, in_flight)
        return Signals(
            load=load,
            waiting=reading.waiting or 0,
            capacity=self._capacity(entry, reading),
            kv_usage=_kv_now(reading, load),
            warm=None if model is None else serves_loaded(reading, model),
            ttfb=ttfb,
            hold=entry.hold,
            ramp=ramp,
        )

    def status(self, name: str, in_flight: int, now: float) -> LoadStatus:
        entry = self._entries.get(name) or _Entry()
        fresh = self._fresh(entry, now)
        reading = entry.reading
        return LoadStatus(
            engine=entry.engine,
            reading=reading,
            age=None if reading is None else max(0.0, now - entry.taken_at),
            stale=reading is not None and fresh is None,
            error=entry.error,
            estimated_load=None if fresh is None else self._estimate(entry, fresh, in_flight),
            capacity=None if reading is None else self._capacity(entry, reading),
            ramp=self.ramp(name, now),
            ttfb=dict(entry.ttfb),
            hold=entry.hold,
        )

    def _fresh(self, entry: _Entry, now: float) -> LoadReading | None:
        if entry.reading is None or now - entry.taken_at > STALE_AFTER * self.interval:
            return None
        return entry.reading

    def _capacity(self, entry: _Entry, reading: LoadReading) -> int | None:
        own = reading.capacity or entry.learned_capacity or entry.kv_capacity
        if own:
            return own
        peers = [
            capacity
            for e in self._entries.values()
            if e.engine == entry.engine and (capacity := e.learned_capacity or e.kv_capacity)
        ]
        return max(*peers, reading.running or 0) if peers else None

    @staticmethod
    def _estimate(entry: _Entry, reading: LoadReading, in_flight: int) -> int | None:
        if reading.waiting is None and reading.running is None:
            return None  # residency only (Ollama): count locally
        reported = (reading.waiting or 0) + (reading.running or 0)
        return max(0, reported - entry.ours_then) + in_flight


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + LATENCY_ALPHA * (sample - previous)


def ours_counted(
    spans: Iterable[tuple[float, float | None]], taken_at: float, received_at: float
) -> tuple[int, int]:
    """(fewest, most) of our requests on the engine at one moment between `taken_at` and
    `received_at`; a span is (sent, finished or None while in flight)."""
    spans = list(spans)
    moments = [taken_at] + [
        at for span in spans for at in span if at is not None and taken_at < at <= received_at
    ]
    counts = [
        sum(sent <= moment and (finished is None or moment < finished) for sent, finished in spans)
        for moment in moments
    ]
    return min(counts), max(counts)


def _kv_now(reading: LoadReading, load: int | None) -> float | None:
    """The KV use brought up to now like the load: each request holding its reported share."""
    reported = (reading.waiting or 0) + (reading.running or 0)
    if reading.kv_usage is None or load is None or not reported:
        return reading.kv_usage
    return min(1.0, reading.kv_usage * load / reported)
