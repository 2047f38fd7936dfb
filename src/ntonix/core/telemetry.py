"""What the gateway counts about its requests: plain numbers, cheap to update on the hot path.

`/metrics` turns these into Prometheus families at scrape time (ntonix.metrics), the access log
writes one line per `RequestRecord`, the dashboard reads `RecentWindow`. Nothing here does I/O
or takes a lock: a request costs a few dictionary increments, not a trip through a metrics
library.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from ntonix.core.tenants import Tenant
from ntonix.core.usage import Usage

if TYPE_CHECKING:
    from ntonix.core.sessions import SessionCounts

# Seconds: from a cache hit (a few ms) to a long generation (a minute).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)

# The paths that get their own `route` label; any other proxied path counts as "other", so
# that a client cannot grow the metrics without bound by inventing paths.
ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/responses",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/tags",
        "/api/show",
    }
)


def route_of(path: str) -> str:
    return path if path in ROUTES else "other"


class RequestRecord:
    """One client request as the access log and the counters see it, filled in as it goes.

    `phase` is where the request is, so that a disconnect can say when the client left:
    "body" (sending its request), "queue" (waiting for a backend slot), "first_byte" (waiting
    for the answer), "stream" (receiving it).
    """

    __slots__ = (
        "backend",
        "bytes_in",
        "bytes_out",
        "cache",
        "chunks",
        "client",
        "disconnected",
        "error",
        "extra_headers",
        "first_byte_at",
        "method",
        "model",
        "outcome",
        "path",
        "phase",
        "request_id",
        "retries",
        "session",
        "started",
        "status",
        "tenant",
        "usage",
        "wall_time",
    )

    def __init__(
        self,
        *,
        started: float,
        wall_time: float,
        request_id: bytes,
        client: str,
        method: str,
        path: str,
        cache: str,
    ) -> None:
        self.started = started
        self.wall_time = wall_time
        self.request_id = request_id
        self.client = client
        self.method = method
        self.path = path
        self.cache = cache
        self.model: str | None = None
        self.tenant: Tenant | None = None  # who asked, once the API key is checked
        self.usage: Usage | None = None  # tokens generated, or served from the cache
        # The gateway's own response headers for this key (x-ratelimit-*), on every answer.
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.backend = ""
        self.status = 0
        self.outcome = "ok"
        self.error = ""
        self.retries = 0
        self.phase = "body"
        self.disconnected = False
        self.first_byte_at: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.chunks = 0
        # A WebSocket session's messages and closes (ntonix.core.sessions.SessionCounts).
        self.session: SessionCounts | None = None

    def note_body(self, size: int, clock: Callable[[], float]) -> None:
        """A body chunk of `size` bytes went to the client; `clock` is read for the first."""
        if self.first_byte_at is None:
            self.first_byte_at = clock()
        self.bytes_out += size
        self.chunks += 1

    def ttft(self) -> float | None:
        """Seconds from arrival to the first body byte sent, for a successful answer."""
        if self.first_byte_at is None or not 200 <= self.status < 400:
            return None
        return self.first_byte_at - self.started


class Histogram:
    """Observations counted into fixed buckets (upper bounds, inclusive) plus +Inf."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, count)."""
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


@attrs.define
class Tallies:
    """Every counter of /metrics that requests and attempts feed (the rest are snapshots)."""

    requests: Counter[tuple[str, str, str, str]] = attrs.field(factory=Counter)
    durations: dict[str, Histogram] = attrs.field(factory=dict)
    ttfts: dict[str, Histogram] = attrs.field(factory=dict)
    chunks: Counter[str] = attrs.field(factory=Counter)
    bytes_out: Counter[str] = attrs.field(factory=Counter)
    bytes_in: int = 0
    active: int = 0
    queue_wait: Histogram = attrs.field(factory=Histogram)
    attempts: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    retries: Counter[str] = attrs.field(factory=Counter)
    failovers: Counter[str] = attrs.field(factory=Counter)
    disconnects: Counter[str] = attrs.field(factory=Counter)
    cancellations: Counter[str] = attrs.field(factory=Counter)

    def begin(self) -> None:
        self.active += 1

    def finish(self, record: RequestRecord, now: float) -> None:
        """Count a request that has ended, whichever way it ended."""
        backend = record.backend
        self.active -= 1
        self.requests[(route_of(record.path), backend, str(record.status), record.cache)] += 1
        _histogram(self.durations, backend).observe(now - record.started)
        ttft = record.ttft()
        if ttft is not None:
            _histogram(self.ttfts, backend).observe(ttft)
        if record.chunks:
            self.chunks[backend] += record.chunks
            self.bytes_out[backend] += record.bytes_out
        self.bytes_in += record.bytes_in
        if record.disconnected:
            self.disconnects[record.phase] += 1


def _histogram(histograms: dict[str, Histogram], key: str) -> Histogram:
    histogram = histograms.get(key)
    if histogram is None:
        histogram = histograms[key] = Histogram()
    return histogram


@attrs.frozen
class SecondSummary:
    at: int  # the second (on the clock `RecentWindow.add` was given)
    requests: int
    ttft_p50: float | None
    ttft_p99: float | None


@attrs.frozen
class WindowSummary:
    requests_per_second: float  # over the last `RATE_SECONDS` whole seconds
    ttft_p50: float | None  # seconds, over the whole window
    ttft_p99: float | None
    backend_ttft_p50: dict[str, float]
    series: tuple[SecondSummary, ...]  # oldest first; seconds without requests included


RATE_SECONDS = 10


class _Second:
    __slots__ = ("at", "requests", "samples", "seen")

    def __init__(self, at: int) -> None:
        self.at = at
        self.requests = 0
        self.seen = 0  # TTFTs offered, of which `samples` keeps a uniform sample
        self.samples: list[tuple[float, str]] = []


class RecentWindow:
    """The last `seconds` seconds of finished requests, one bucket per second.

    Each second keeps at most `samples_per_second` TTFTs (a uniform reservoir sample), so the
    memory and the cost of a summary stay bounded however busy the gateway is.
    """

    def __init__(
        self,
        seconds: int = 60,
        samples_per_second: int = 512,
        rng: random.Random | None = None,
    ) -> None:
        self.seconds = seconds
        self._cap = samples_per_second
        self._rng = rng or random.Random()
        self._ring = [_Second(-1) for _ in range(seconds)]

    def add(self, now: float, backend: str, ttft: float | None) -> None:
        at = math.floor(now)
        second = self._ring[at % self.seconds]
        if second.at != at:
            second = self._ring[at % self.seconds] = _Second(at)
        second.requests += 1
        if ttft is None:
            return
        second.seen += 1
        if len(second.samples) < self._cap:
            second.samples.append((ttft, backend))
        else:
            slot = self._rng.randrange(second.seen)
            if slot < self._cap:
                second.samples[slot] = (ttft, backend)

    def summary(self, now: float) -> WindowSummary:
        current = math.floor(now)
        by_second = {s.at: s for s in self._ring if current - self.seconds < s.at <= current}
        series = []
        everything: list[float] = []
        per_backend: dict[str, list[float]] = {}
        for at in range(current - self.seconds + 1, current + 1):
            second = by_second.get(at)
            if second is None:
                series.append(SecondSummary(at, 0, None, None))
                continue
            values = sorted(ttft for ttft, _ in second.samples)
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            series.append(SecondSummary(at, second.requests, p50, p99))
            everything += values
            for ttft, backend in second.samples:
                per_backend.setdefault(backend, []).append(ttft)
        everything.sort()
        recent = sum(
            by_second[at].requests
            for at in range(current - RATE_SECONDS, current)
            if at in by_second
        )
        medians = {name: percentile(sorted(v), 0.5) for name, v in per_backend.items()}
        return WindowSummary(
            requests_per_second=recent / RATE_SECONDS,
            ttft_p50=percentile(everything, 0.5),
            ttft_p99=percentile(everything, 0.99),
            backend_ttft_p50={name: m for name, m in medians.items() if m is not None},
            series=tuple(series),
        )


def percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of an ascending list; None when it is empty."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
