"""The engines' load as /ntonix/status, the dashboard and /metrics show it, per backend.

A worker builds its loads when its figures are taken (a status request, a dashboard tick, a
scrape, a peer's ask) from its load book and health table, never kept: what they show is what
`least-loaded` would decide from now. The score is the backend's least-loaded score for the next
request of an unnamed model. The JSON and the metric families are built from the gateway's
merged figures (core/load_figures.py says how N workers' loads merge).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from ntonix.core.health import HealthTable
from ntonix.core.least_loaded import scores
from ntonix.core.load_figures import BackendLoad
from ntonix.core.signals import LoadBook


def backend_loads(book: LoadBook, health: HealthTable, now: float) -> tuple[BackendLoad, ...]:
    candidates = book.annotate(health.candidates(health.names), None, now)
    score = scores(candidates)
    in_flight = {c.name: c.in_flight for c in candidates}
    return tuple(
        BackendLoad(name, book.status(name, in_flight[name], now), score[name])
        for name in in_flight
    )


def as_json(load: BackendLoad) -> dict[str, object]:
    status, reading = load.status, load.status.reading
    return {
        "engine": status.engine or "unknown",
        "reading": None
        if reading is None
        else {
            "waiting": reading.waiting,
            "running": reading.running,
            "kv_usage": reading.kv_usage,
            "capacity": status.capacity,
            "loaded_models": None
            if reading.models is None
            else [{"name": m.name, "expires_at": m.expires_at or None} for m in reading.models],
        },
        "age_seconds": None if status.age is None else round(status.age, 3),
        "stale": status.stale,
        "error": status.error,
        "estimated_load": status.estimated_load,
        "slow_start": round(status.ramp, 3),
        "ttfb_ewma_ms": {
            (model or "*"): round(seconds * 1000, 3) for model, seconds in status.ttfb.items()
        },
        "hold_ewma_ms": None if status.hold is None else round(status.hold * 1000, 3),
        "score": round(load.score, 4),
    }


_GAUGES = (
    ("waiting", "ntonix_backend_engine_waiting", "Requests queued, as the engine last said"),
    ("running", "ntonix_backend_engine_running", "Requests generating, as the engine last said"),
    ("kv", "ntonix_backend_engine_kv_usage", "KV-cache use 0..1, as the engine last said"),
    ("age", "ntonix_backend_load_signal_age_seconds", "Age of the engine's last reading"),
    ("score", "ntonix_backend_load_score", "The least-loaded score: the lowest takes the next"),
    ("ramp", "ntonix_backend_slow_start_ratio", "Share of its weight the backend takes now"),
)


def load_metrics(loads: Sequence[BackendLoad]) -> Iterator[Metric]:
    """The engines' signals as metric families."""
    engine = InfoMetricFamily(
        "ntonix_backend_engine", "The engine each backend runs, as configured or detected",
        labels=["backend"],
    )  # fmt: skip
    gauges = {key: GaugeMetricFamily(name, text, labels=["backend"]) for key, name, text in _GAUGES}
    loaded = GaugeMetricFamily(
        "ntonix_backend_model_loaded", "1 for each model the engine holds in memory",
        labels=["backend", "model"],
    )  # fmt: skip
    ttfb = GaugeMetricFamily(
        "ntonix_backend_ttfb_ewma_seconds",
        'Moving average of the time to first byte, by backend and model ("*": all)',
        labels=["backend", "model"],
    )
    for load in loads:
        status, reading, name = load.status, load.status.reading, load.name
        engine.add_metric([name], {"engine": status.engine or "unknown"})
        gauges["score"].add_metric([name], load.score)
        gauges["ramp"].add_metric([name], status.ramp)
        if status.age is not None:
            gauges["age"].add_metric([name], status.age)
        for model_name, seconds in sorted(status.ttfb.items()):
            ttfb.add_metric([name, model_name or "*"], seconds)
        if reading is None or status.stale:
            continue
        for key, value in (
            ("waiting", reading.waiting),
            ("running", reading.running),
            ("kv", reading.kv_usage),
        ):
            if value is not None:
                gauges[key].add_metric([name], value)
        for model in reading.models or ():
            loaded.add_metric([name, model.name], 1)
    yield engine
    yield from gauges.values()
    yield loaded
    yield ttfb
