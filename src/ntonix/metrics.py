"""`GET /metrics`: Prometheus text format through prometheus-client.

Everything here is read from the components' frozen snapshots at scrape time (the health
table's, the pools', the cache's), so a scrape costs the hot path nothing and can never
disagree with `/ntonix/status`. Each gateway has its own registry: several can share a process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ntonix.cache import CacheStatistics
from ntonix.core.health import BackendSnapshot
from ntonix.upstream import PoolStatistics

BREAKER_STATES = ("closed", "open", "half-open")


class GatewayCollector(Collector):
    """Turns one gateway's snapshots into metric families at each scrape."""

    def __init__(
        self,
        backends: Callable[[], tuple[BackendSnapshot, ...]],
        pools: Callable[[], dict[str, PoolStatistics]],
        cache: Callable[[], CacheStatistics | None],
    ) -> None:
        self._backends = backends
        self._pools = pools
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        yield from self._backend_metrics()
        yield from self._cache_metrics()

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
        for backend in self._backends():
            for name in BREAKER_STATES:
                state.add_metric([backend.name, name], 1.0 if backend.state == name else 0.0)
            in_flight.add_metric([backend.name], backend.in_flight)
            failures.add_metric([backend.name], backend.consecutive_failures)
            if backend.latency_ms is not None:
                latency.add_metric([backend.name], backend.latency_ms / 1000)
        idle = GaugeMetricFamily(
            "ntonix_upstream_idle_connections", "Idle keep-alive connections", labels=["backend"]
        )
        opened = CounterMetricFamily(
            "ntonix_upstream_connections_opened", "Upstream connections opened", labels=["backend"]
        )
        for name, pool in self._pools().items():
            idle.add_metric([name], pool.idle)
            opened.add_metric([name], pool.opened)
        yield from (state, in_flight, failures, latency, idle, opened)

    def _cache_metrics(self) -> Iterator[Metric]:
        stats = self._cache()
        if stats is None:
            return
        for name, value, help_text in (
            ("hits", stats.hits, "Requests answered from the cache"),
            ("misses", stats.misses, "Cacheable requests that went upstream"),
            ("coalesced", stats.coalesced, "Requests that joined an identical one in flight"),
            ("bypass", stats.bypass, "Requests the cache did not take part in"),
            ("evictions", stats.evictions, "Entries evicted for room"),
            ("expirations", stats.expirations, "Entries dropped for their TTL"),
            ("stored", stats.stored, "Responses stored"),
            ("dropped_offers", stats.dropped_offers, "Responses not stored: the writer was behind"),
        ):
            yield CounterMetricFamily(f"ntonix_cache_{name}", help_text, value=value)
        yield GaugeMetricFamily("ntonix_cache_entries", "Entries in the cache", value=stats.entries)
        yield GaugeMetricFamily("ntonix_cache_bytes", "Bytes held by the cache", value=stats.bytes)
        # Every hit and every follower is a request no backend had to serve.
        yield CounterMetricFamily(
            "ntonix_cache_backend_requests_saved",
            "Backend requests the cache saved (hits plus coalesced followers)",
            value=stats.hits + stats.coalesced,
        )


def registry_for(collector: GatewayCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
