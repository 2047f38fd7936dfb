"""`GET /metrics`: Prometheus text format through prometheus-client.

Everything here is read at scrape time from figures (`ntonix.core.figures`): one worker's, made
from the components' frozen snapshots (the health table's, the pools', the cache's) and the
plain counters requests feed as they end (`Tallies`), or with `ntonix serve --workers N` every
worker's, merged. So a request pays a few dictionary increments and no metrics-library locks
or shared-memory writes, and a scrape can never disagree with `/ntonix/status`. Each scrape
builds its own registry: several gateways can share a process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ntonix.core.figures import Figures
from ntonix.core.telemetry import Histogram

BREAKER_STATES = ("closed", "open", "half-open")


class GatewayCollector(Collector):
    """Turns a gateway's figures into metric families."""

    def __init__(self, figures: Figures) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ntonix_workers",
            "Worker processes of this instance whose figures these are",
            value=self._figures.workers,
        )
        yield from self._request_metrics()
        yield from self._attempt_metrics()
        yield from self._backend_metrics()
        yield from self._cache_metrics()

    def _request_metrics(self) -> Iterator[Metric]:
        tallies = self._figures.tallies
        yield _counter(
            "ntonix_requests",
            "Client API requests that ended, by route, backend, status and cache result",
            ["route", "backend", "status", "cache"],
            tallies.requests.items(),
        )
        yield _histograms(
            "ntonix_request_duration_seconds",
            "From the request's arrival to the end of its response, by backend",
            tallies.durations,
        )
        yield _histograms(
            "ntonix_time_to_first_token_seconds",
            "From the request's arrival to the first body byte of a successful response",
            tallies.ttfts,
        )
        yield _counter(
            "ntonix_response_chunks",
            "Body chunks sent to clients, by backend",
            ["backend"],
            _one_label(tallies.chunks),
        )
        yield _counter(
            "ntonix_response_bytes",
            "Body bytes sent to clients, by backend",
            ["backend"],
            _one_label(tallies.bytes_out),
        )
        yield CounterMetricFamily(
            "ntonix_request_bytes", "Request body bytes received", value=tallies.bytes_in
        )
        yield GaugeMetricFamily(
            "ntonix_active_requests",
            "Client API requests in progress (a streaming one is one open stream)",
            value=tallies.active,
        )
        yield _counter(
            "ntonix_client_disconnects",
            "Clients that left before their response ended, by phase "
            "(body, queue, first_byte, stream)",
            ["phase"],
            _one_label(tallies.disconnects),
        )
        yield CounterMetricFamily(
            "ntonix_access_log_dropped_lines",
            "Access log lines dropped: the log could not keep up, or could not be written",
            value=self._figures.access_log_dropped,
        )

    def _attempt_metrics(self) -> Iterator[Metric]:
        tallies = self._figures.tallies
        queue_wait = HistogramMetricFamily(
            "ntonix_queue_wait_seconds",
            "Time requests waited for a backend slot (only requests that had to wait)",
        )
        _add_histogram(queue_wait, [], tallies.queue_wait)
        yield queue_wait
        yield _counter(
            "ntonix_upstream_attempts",
            "Tries on a backend, by how they ended",
            ["backend", "outcome"],
            tallies.attempts.items(),
        )
        yield _counter(
            "ntonix_retries",
            "Failed tries that were retried on another backend, by the backend that failed",
            ["backend"],
            _one_label(tallies.retries),
        )
        yield _counter(
            "ntonix_failovers",
            "Requests answered by a backend after another had failed, by the one that answered",
            ["backend"],
            _one_label(tallies.failovers),
        )
        yield _counter(
            "ntonix_upstream_cancellations",
            "Upstream requests cancelled because their clients left",
            ["backend"],
            _one_label(tallies.cancellations),
        )

    def _backend_metrics(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "ntonix_backend_state",
            "1 for the breaker state the backend is in",
            labels=["backend", "state"],
        )
        in_flight = GaugeMetricFamily(
            "ntonix_backend_in_flight_requests",
            "Requests in flight to the backend",
            labels=["backend"],
        )
        failures = GaugeMetricFamily(
            "ntonix_backend_consecutive_failures",
            "Consecutive failures (probes and traffic) of the backend",
            labels=["backend"],
        )
        latency = GaugeMetricFamily(
            "ntonix_backend_ttfb_seconds",
            "Moving average of the backend's time to first byte",
            labels=["backend"],
        )
        for backend in self._figures.backends:
            for name in BREAKER_STATES:
                state.add_metric([backend.name, name], 1.0 if backend.state == name else 0.0)
            in_flight.add_metric([backend.name], backend.in_flight)
            failures.add_metric([backend.name], backend.consecutive_failures)
            if backend.latency_ms is not None:
                latency.add_metric([backend.name], backend.latency_ms / 1000)
        yield from (state, in_flight, failures, latency)
        yield _counter(
            "ntonix_breaker_transitions",
            "Circuit breaker state changes caused by outcomes (open -> half-open is the clock)",
            ["backend", "from_state", "to_state"],
            self._figures.transitions.items(),
        )
        idle = GaugeMetricFamily(
            "ntonix_upstream_idle_connections", "Idle keep-alive connections", labels=["backend"]
        )
        opened = CounterMetricFamily(
            "ntonix_upstream_connections_opened", "Upstream connections opened", labels=["backend"]
        )
        for name, pool in self._figures.pools.items():
            idle.add_metric([name], pool["idle"])
            opened.add_metric([name], pool["opened"])
        yield from (idle, opened)

    def _cache_metrics(self) -> Iterator[Metric]:
        stats = self._figures.cache
        if stats is None:
            return
        for name, help_text in (
            ("hits", "Requests answered from the cache"),
            ("misses", "Cacheable requests that went upstream"),
            ("coalesced", "Requests that joined an identical one in flight"),
            ("bypass", "Requests the cache did not take part in"),
            ("evictions", "Entries evicted for room"),
            ("expirations", "Entries dropped for their TTL"),
            ("stored", "Responses stored"),
            ("dropped_offers", "Responses not stored: the writer was behind"),
        ):
            yield CounterMetricFamily(f"ntonix_cache_{name}", help_text, value=stats[name])
        for name, help_text in (
            ("entries", "Entries in the workers' caches"),
            ("bytes", "Bytes held by the workers' caches"),
            ("max_entries", "max_entries, times the workers (one cache each)"),
            ("max_bytes", "max_bytes, times the workers (one cache each)"),
        ):
            yield GaugeMetricFamily(f"ntonix_cache_{name}", help_text, value=stats[name])
        # Every hit and every follower is a request no backend had to serve.
        yield CounterMetricFamily(
            "ntonix_cache_backend_requests_saved",
            "Backend requests the cache saved (hits plus coalesced followers)",
            value=stats["hits"] + stats["coalesced"],
        )


def _counter(
    name: str,
    documentation: str,
    labels: list[str],
    samples: Iterable[tuple[tuple[str, ...], int]],
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in sorted(samples):
        family.add_metric(list(values), count)
    return family


def _one_label(counter: Counter[str]) -> Iterator[tuple[tuple[str], int]]:
    return (((key,), count) for key, count in counter.items())


def _histograms(
    name: str, documentation: str, by_backend: dict[str, Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["backend"])
    for backend, histogram in sorted(by_backend.items()):
        _add_histogram(family, [backend], histogram)
    return family


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
    family.add_metric(labels, buckets, histogram.total)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def exposition(figures: Figures) -> bytes:
    """The Prometheus text of `figures`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(figures))
    return generate_latest(registry)
