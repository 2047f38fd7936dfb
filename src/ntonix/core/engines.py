"""What the engines say about their own load: one `LoadReading` from what each already serves.

Invariants: parsing is pure (text or a parsed JSON value in, a frozen reading out, or
`SignalError` naming what was wrong); a reading holds only what the engine reported (None
where it reported nothing, never a guess); a value that is negative, not a number or not
finite is refused, so the balancer never sees one. Several series of one gauge (a vLLM server
with two engines, or one label set per model) add up; KV-cache use takes the fullest.

The engines and their signals (names checked against their sources; tests/data/ has samples):
- vLLM `/metrics`: vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc
  (before v0.10: vllm:gpu_cache_usage_perc), all gauges, labelled with model_name.
- SGLang `/metrics`: sglang:num_queue_reqs, sglang:num_running_reqs, sglang:token_usage.
- llama.cpp `llama-server --metrics`: llamacpp:requests_deferred, llamacpp:requests_processing,
  and llamacpp:kv_cache_usage_ratio in the releases that had it; without --metrics, `/slots`
  lists each slot with `is_processing` (its length is the capacity).
- TGI `/metrics`: tgi_queue_size, tgi_batch_current_size.
- Ollama `/api/ps`: the loaded models and when each will be unloaded; no queue.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import attrs
from prometheus_client.parser import text_string_to_metric_families

ENGINES = ("auto", "vllm", "sglang", "llamacpp", "tgi", "ollama", "none")
METRICS_ENGINES = ("vllm", "sglang", "llamacpp", "tgi")


class SignalError(ValueError):
    """A signal endpoint answered something that is not a reading."""


@attrs.frozen
class LoadedModel:
    """A model an engine holds in memory; `expires_at` as the engine wrote it ("" = never)."""

    name: str
    expires_at: str = ""


@attrs.frozen
class LoadReading:
    """One engine's own account of its load at one moment."""

    engine: str  # one of ENGINES but "auto" and "none"
    waiting: int | None = None  # requests queued, not yet generating
    running: int | None = None  # requests generating now
    kv_usage: float | None = None  # fraction of the KV cache in use, 0..1
    capacity: int | None = None  # requests it can generate at once, when it says
    models: tuple[LoadedModel, ...] | None = None  # loaded models; None = not reported


@attrs.frozen
class _Gauges:
    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv: tuple[str, ...]  # the first present wins (vLLM renamed its gauge)
    capacity: tuple[str, ...] = ()


_GAUGES = {
    "vllm": _Gauges(
        ("vllm:num_requests_waiting",),
        ("vllm:num_requests_running",),
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    "sglang": _Gauges(
        ("sglang:num_queue_reqs",),
        ("sglang:num_running_reqs",),
        ("sglang:token_usage",),
        ("sglang:max_running_requests",),
    ),
    "llamacpp": _Gauges(
        ("llamacpp:requests_deferred",),
        ("llamacpp:requests_processing",),
        ("llamacpp:kv_cache_usage_ratio",),
    ),
    "tgi": _Gauges(("tgi_queue_size",), ("tgi_batch_current_size",), ()),
}


def _samples(text: str) -> dict[str, list[tuple[Mapping[str, str], float]]]:
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError) as error:
        raise SignalError(f"not Prometheus text: {error}") from error
    found: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for family in families:
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, float(sample.value)))
    return found


def detect_engine(names: Iterable[str]) -> str | None:
    """The engine whose queue gauges are among these metric names, or None."""
    present = set(names)
    for engine, gauges in _GAUGES.items():
        if present & {*gauges.waiting, *gauges.running}:
            return engine
    return None


def read_metrics(text: str, engine: str | None = None) -> LoadReading:
    """A reading from a Prometheus `/metrics` page; `engine` None detects it from the names."""
    samples = _samples(text)
    engine = engine or detect_engine(samples)
    if engine is None:
        raise SignalError("no vLLM, SGLang, llama.cpp or TGI load gauge on this /metrics page")
    gauges = _GAUGES[engine]
    waiting = _total(samples, gauges.waiting)
    running = _total(samples, gauges.running)
    if waiting is None and running is None:
        raise SignalError(f"no {engine} queue gauge ({gauges.waiting[0]}) on this /metrics page")
    kv = next((v for name in gauges.kv if (v := _fullest(samples, name)) is not None), None)
    capacity = _total(samples, gauges.capacity)
    # vLLM and SGLang label every series with the model they serve: that model is loaded.
    models = sorted(
        {labels.get("model_name", "") for series in samples.values() for labels, _ in series} - {""}
    )
    return LoadReading(
        engine=engine,
        waiting=waiting,
        running=running,
        kv_usage=None if kv is None else min(kv, 1.0),
        capacity=capacity or None,
        models=tuple(LoadedModel(name) for name in models) or None,
    )


def read_llamacpp_slots(payload: object) -> LoadReading:
    """A reading from llama-server's `/slots`: busy slots run, their count is the capacity."""
    if not isinstance(payload, list) or not all(isinstance(s, Mapping) for s in payload):
        raise SignalError("llama.cpp /slots must be a JSON array of slot objects")
    busy = [s.get("is_processing") for s in payload]
    if not all(isinstance(b, bool) for b in busy):
        raise SignalError("llama.cpp /slots: every slot needs a boolean is_processing")
    return LoadReading(
        engine="llamacpp", running=sum(map(bool, busy)), capacity=len(payload) or None
    )


def read_ollama_ps(payload: object) -> LoadReading:
    """A reading from Ollama's `/api/ps`: which models are loaded, and until when."""
    models = payload.get("models") if isinstance(payload, Mapping) else None
    if not isinstance(models, list):
        raise SignalError('Ollama /api/ps must be a JSON object with a "models" array')
    loaded = []
    for entry in models:
        name = entry.get("name") or entry.get("model") if isinstance(entry, Mapping) else None
        if not isinstance(name, str):
            raise SignalError("Ollama /api/ps: every model needs a string name")
        expires = entry.get("expires_at")
        loaded.append(LoadedModel(name, expires if isinstance(expires, str) else ""))
    return LoadReading(engine="ollama", models=tuple(loaded))


def serves_loaded(reading: LoadReading, model: str) -> bool | None:
    """Whether `model` is loaded on the engine; None when the reading does not say."""
    if reading.models is None:
        return None
    names = {loaded.name for loaded in reading.models}
    # Ollama answers "llama3" with "llama3:latest" and lists the latter.
    return model in names or (":" not in model and f"{model}:latest" in names)


def _values(samples: Mapping[str, list[tuple[Mapping[str, str], float]]], name: str) -> list[float]:
    values = [value for _, value in samples.get(name, ())]
    for value in values:
        if not (math.isfinite(value) and value >= 0):
            raise SignalError(f"{name} is {value}: a load gauge must be a finite number >= 0")
    return values


def _total(
    samples: Mapping[str, list[tuple[Mapping[str, str], float]]], names: Iterable[str]
) -> int | None:
    for name in names:
        values = _values(samples, name)
        if values:
            return round(sum(values))
    return None


def _fullest(
    samples: Mapping[str, list[tuple[Mapping[str, str], float]]], name: str
) -> float | None:
    values = _values(samples, name)
    return max(values) if values else None
