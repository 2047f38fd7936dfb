"""The engines' load per backend as figures (core/figures.py): one worker's, or a gateway's.

Invariants: a backend's reading is the engine's own account, the same truth whichever worker
read it, so the gateway shows the freshest one any live worker holds (with its engine, age,
staleness, error and capacity). What follows from this worker's own traffic and clock (the
estimated load, the slow-start ramp, the TTFB and hold-time averages and the score) is per
worker: the gateway shows the answering worker's, which comes first in `merge_loads`'s views
(for a backend it does not list, during a reload, the first worker's that does). A gone worker's
loads are not shown: they describe a moment, not a count. `decode_loads(encode_loads(x))` gives
`x` back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ntonix.core.engines import LoadedModel, LoadReading
from ntonix.core.signals import LoadStatus


@attrs.frozen
class BackendLoad:
    """One backend's signals and its least-loaded score for the next request of any model."""

    name: str
    status: LoadStatus
    score: float


def merge_loads(views: Sequence[Sequence[BackendLoad]]) -> tuple[BackendLoad, ...]:
    """One entry per backend, in the order the first view lists them: the freshest reading of
    all views, with the first view's own estimate, ramp, latency and score."""
    by_name: dict[str, list[BackendLoad]] = {}
    for view in views:
        for load in view:
            by_name.setdefault(load.name, []).append(load)
    return tuple(_merge(loads) for loads in by_name.values())


def _merge(loads: list[BackendLoad]) -> BackendLoad:
    own = loads[0]
    read = [load.status for load in loads if load.status.age is not None]
    if not read:
        return own
    freshest = min(read, key=lambda status: status.age or 0.0)
    status = attrs.evolve(
        own.status,
        engine=freshest.engine,
        reading=freshest.reading,
        age=freshest.age,
        stale=freshest.stale,
        error=freshest.error,
        capacity=freshest.capacity,
    )
    return BackendLoad(own.name, status, own.score)


def encode_loads(loads: Iterable[BackendLoad]) -> list[dict[str, Any]]:
    return [attrs.asdict(load) for load in loads]


def decode_loads(rows: Iterable[Mapping[str, Any]]) -> tuple[BackendLoad, ...]:
    """The loads `encode_loads` gave; KeyError, TypeError or ValueError if they are not such."""
    return tuple(_decode(row) for row in rows)


def _decode(row: Mapping[str, Any]) -> BackendLoad:
    status = row["status"]
    reading = status["reading"]
    return BackendLoad(
        name=str(row["name"]),
        status=LoadStatus(
            engine=str(status["engine"]),
            reading=None if reading is None else _reading(reading),
            age=_number(status["age"]),
            stale=bool(status["stale"]),
            error=str(status["error"]),
            estimated_load=_count(status["estimated_load"]),
            capacity=_count(status["capacity"]),
            ramp=float(status["ramp"]),
            ttfb={str(model): float(seconds) for model, seconds in status["ttfb"].items()},
            hold=_number(status["hold"]),
        ),
        score=float(row["score"]),
    )


def _reading(data: Mapping[str, Any]) -> LoadReading:
    models = data["models"]
    return LoadReading(
        engine=str(data["engine"]),
        waiting=_count(data["waiting"]),
        running=_count(data["running"]),
        kv_usage=_number(data["kv_usage"]),
        capacity=_count(data["capacity"]),
        models=None
        if models is None
        else tuple(LoadedModel(str(m["name"]), str(m["expires_at"])) for m in models),
    )


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _count(value: Any) -> int | None:
    return None if value is None else int(value)
